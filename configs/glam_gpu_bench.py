"""GLaM-1.7B shapes cut to fit one H100 for the full-step benchmark (experiments/bench.py).

8 layers = 4 scanned (dense, MoE) blocks, M=2048, 16x128 heads, H=8192 gated GELU, vocab
32768, 8 experts top-2, B=8 x S=2048: the reference model of reference/moe.md section 6.
"""

import ml_collections

from configs import glam


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = glam.get_config("1_7b")
    config.model.num_layers = 8
    config.model.vocab_size = 32768
    config.model.max_len = 2048
    config.model.remat_policy = "dots_with_no_batch_dims_saveable"
    config.moe.num_experts = 8 if arg in (None, "", "moe") else 0  # ':dense' = the dense twin
    config.moe.group_size = 1024
    config.train.batch_size = 8
    config.train.eval_batch_size = 8
    config.train.seq_len = 2048
    config.train.optimizer = "adamw"
    config.train.learning_rate = 3e-4
    config.train.warmup_steps = 100
    config.train.logits_z_loss_weight = 0.0
    config.data.tokenizer_path = ""  # benchmarks feed random tokens
    return config
