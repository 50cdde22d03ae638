"""The relative-position bias built as a Toeplitz matrix, and model.document_mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glam_jax import attention, steps
from tests.helpers import tiny_config


@pytest.mark.parametrize("length", [1, 2, 3, 17, 200])
@pytest.mark.parametrize(("buckets", "max_distance"), [(32, 128), (8, 16)])
def test_relative_bias_equals_the_bucket_lookup(length, buckets, max_distance):
    table = np.random.RandomState(length).normal(size=(3, buckets)).astype(np.float32)
    ids_ts = attention.relative_position_buckets(length, buckets, max_distance)
    expected_hts = table[:, ids_ts]  # numpy gather: bias[h, q, k] = table[h, bucket(k - q)]
    got = attention.relative_bias(jnp.asarray(table), length, max_distance)
    np.testing.assert_array_equal(np.asarray(got), expected_hts)


def test_relative_bias_gradient_sums_each_bucket():
    """d/dtable of sum(bias * w) = sum of w over the (q, k) cells of each bucket."""
    length, buckets, max_distance = 40, 8, 16
    rng = np.random.RandomState(0)
    table = rng.normal(size=(2, buckets)).astype(np.float32)
    w_hts = rng.normal(size=(2, length, length)).astype(np.float32)
    grad = jax.grad(lambda t: jnp.sum(attention.relative_bias(t, length, max_distance) * w_hts))(
        jnp.asarray(table)
    )
    ids_ts = attention.relative_position_buckets(length, buckets, max_distance)
    expected = np.stack([[w_hts[h][ids_ts == b].sum() for b in range(buckets)] for h in range(2)])
    np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-5)


def test_relative_bias_gradient_is_summed_in_float32_for_bfloat16_tables():
    """Each bucket's gradient sums up to S cells; with a bfloat16 table only the final result
    is rounded to bfloat16, not the running sums."""
    length, buckets, max_distance = 512, 32, 128
    rng = np.random.RandomState(1)
    table = rng.normal(size=(2, buckets)).astype(np.float32)
    w_hts = rng.normal(size=(2, length, length)).astype(np.float32)

    def grad(dtype):
        return jax.grad(
            lambda t: jnp.sum(
                attention.relative_bias(t, length, max_distance).astype(jnp.float32) * w_hts
            )
        )(jnp.asarray(table, dtype))

    exact, half = np.asarray(grad(jnp.float32)), np.asarray(grad(jnp.bfloat16), np.float32)
    # bfloat16 rounding of the cotangent cells and of the result: well under 1%.
    np.testing.assert_allclose(half, exact, rtol=1e-2, atol=1e-2 * np.abs(exact).max())


def _logits(config, tokens, segment_ids):
    model = steps.build_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens))["params"]
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    out, _ = model.apply({"params": params}, jnp.asarray(tokens), segment_ids, positions)
    return np.asarray(out)


def test_document_mask_off_changes_nothing_for_one_document_per_row():
    """Rows of one document then padding (segment 0): the mask only hides later padding."""
    config = tiny_config()
    config.moe.capacity_factor_eval = float(config.moe.num_experts)  # nothing drops
    s = config.train.seq_len
    tokens = np.random.RandomState(1).randint(1, 256, (2, s)).astype(np.int32)
    segment_ids = np.ones((2, s), np.int32)
    segment_ids[1, 20:] = 0  # trailing padding
    masked = _logits(config, tokens, segment_ids)
    config.model.document_mask = False
    unmasked = _logits(config, tokens, segment_ids)
    real = segment_ids > 0
    np.testing.assert_allclose(unmasked[real], masked[real], atol=1e-6)


def test_document_mask_off_lets_a_packed_row_attend_across_documents():
    config = tiny_config()
    config.moe.capacity_factor_eval = float(config.moe.num_experts)
    s = config.train.seq_len
    tokens = np.random.RandomState(2).randint(1, 256, (1, s)).astype(np.int32)
    segment_ids = np.where(np.arange(s) < 13, 1, 2)[None].astype(np.int32)
    masked = _logits(config, tokens, segment_ids)
    config.model.document_mask = False
    unmasked = _logits(config, tokens, segment_ids)
    np.testing.assert_allclose(unmasked[0, :13], masked[0, :13], atol=1e-6)  # doc 1: causal
    assert np.max(np.abs(unmasked[0, 13:] - masked[0, 13:])) > 1e-4  # doc 2 now sees doc 1
