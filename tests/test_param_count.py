"""Parameter counts: exact on a small model; within 5% of the GLaM paper (two-matrix FFN)."""

import pytest

from configs import glam
from glam_jax import flops
from tests.helpers import tiny_config


def test_exact_count_on_tiny_config():
    c = tiny_config()
    m, h, v, e = c.model.embed_dim, c.model.mlp_dim, c.model.vocab_size, c.moe.num_experts
    heads, d, layers = c.model.num_heads, c.model.head_dim, c.model.num_layers
    attn = 4 * m * heads * d + heads * c.model.rel_buckets
    norms = 2 * m
    dense_ffn = 3 * m * h
    expert_ffn = e * 3 * m * h + m * e  # experts + router
    per_block = 2 * (attn + norms) + dense_ffn + expert_ffn
    total = layers // 2 * per_block + v * m + m
    counts = flops.count(c)
    assert counts.total_params == total
    assert counts.expert_params == layers // 2 * e * 3 * m * h
    k_over_e = c.moe.num_selected / e
    assert counts.activated_params == total - counts.expert_params + round(
        counts.expert_params * k_over_e
    )


@pytest.mark.parametrize("size", ["0_1b", "1_7b", "8b", "64b"])
def test_glam_totals_within_5_percent_of_paper(size):
    config = glam.get_config(size)
    counts = flops.count(config)
    ratio = counts.total_params_two_matrix / config.paper.total_params
    assert 0.95 <= ratio <= 1.05, ratio


@pytest.mark.parametrize("size", ["0_1b", "1_7b", "8b"])
def test_glam_activated_within_5_percent_of_paper(size):
    config = glam.get_config(size)
    counts = flops.count(config)
    ratio = counts.activated_params_two_matrix / config.paper.activated_params
    assert 0.95 <= ratio <= 1.05, ratio


def test_flops_per_token_is_six_times_activated_matmul_weights_plus_attention():
    c = tiny_config()
    counts = flops.count(c)
    attention = 2 * 2 * (c.train.seq_len / 2) * c.model.num_heads * c.model.head_dim
    attention *= c.model.num_layers
    assert counts.flops_per_token == pytest.approx(3 * counts.flops_per_token_forward)
    assert counts.flops_per_token_forward > attention
