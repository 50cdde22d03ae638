"""The MoE-vs-dense study (experiments/moe_vs_dense.py): one recipe, several arms.

python experiments/train.py --config=configs/moe_vs_dense.py:arm=moe16,seed=1 --workdir=...
Variant keys: arm (a name of ARMS), seed, steps, scale (`h200`, the study; `tiny`, a CPU smoke
test of the same arms). Unknown keys or values are refused in one sentence.

Every arm shares the data, the tokens per step, the optimizer recipe and the seed; MoE arms
are matched to the dense baseline on activated training FLOPs per token: top-2 arms use experts
of half the dense FFN width, the Switch arm top-1 experts of the full width, so each token's FFN
work equals one dense FFN (the router adds E x M weights, under 0.1% at E=64).

Scale `h200`: GLaM-0.1B's layer shapes (12 layers, M 768, 12 heads x 64, H 3072 gated GELU,
113M non-embedding parameters dense), a 16,384-piece BPE tokenizer, rows of 1,024 tokens and
32 rows a step (32,768 tokens), AdamW with a cosine schedule. Chosen so that each arm's
1,200 steps (39M tokens; the plain-JAX reference of docs/research/moe_vs_dense.md ran 1,500) take a
few minutes on one H200 at the speed of the project's dropless kernels.
"""

import ml_collections

from glam_jax.presets import variants
from glam_jax.presets.base import get_base_config

# name: (experts, router, k, expert width as a fraction of the dense FFN width)
ARMS = {
    "dense": (0, "gshard_top2", 2, 1.0),
    "moe8": (8, "gshard_top2", 2, 0.5),  # GLaM-style top-2, every other layer
    "moe16": (16, "gshard_top2", 2, 0.5),
    "moe64": (64, "gshard_top2", 2, 0.5),
    "switch16": (16, "switch_top1", 1, 1.0),  # Switch top-1, full-width experts
    "topk32": (32, "topk_softmax", 4, 0.25),  # fine-grained: 4 of 32 quarter-width experts
}
SCALES = ("h200", "tiny")
VARIANT = {"arm": "dense", "seed": 0, "steps": 0, "scale": "h200"}


def parse_variant(arg: str | None) -> dict:
    """'arm=moe16,seed=1' -> {'arm': 'moe16', 'seed': 1, 'steps': 0, 'scale': 'h200'}."""
    variant = variants.parse_variant(arg, VARIANT, where="study")
    if variant["arm"] not in ARMS:
        raise ValueError(f"study arm {variant['arm']!r} is not known; valid: {', '.join(ARMS)}.")
    if variant["scale"] not in SCALES:
        raise ValueError(f"study scale {variant['scale']!r} is not one of {', '.join(SCALES)}.")
    return variant


def _study_scale(config: ml_collections.ConfigDict) -> None:
    """The H200 study: GLaM-0.1B layer shapes on the Python sources of the running interpreter."""
    m, t, d = config.model, config.train, config.data
    m.num_layers, m.embed_dim, m.mlp_dim, m.num_heads, m.head_dim = 12, 768, 3072, 12, 64
    m.vocab_size = 16384
    m.max_len = 1024
    m.scan_layers = False  # unrolled: 10-15% faster steps on GPUs (README, "Performance")
    m.remat_policy = "none"  # 12 layers of 32k tokens fit without rematerialisation
    m.logits_via_embedding_scale = False  # GPT-2's tied head: x @ E^T with E ~ N(0, 0.02);
    # GLaM's 1/sqrt(M) scale on such a table starts the logits ~0.02 wide and AdamW at 1e-3 took
    # 1,500 steps to open them (first study run: 2.30 bits/char, docs/research/moe_vs_dense.md)
    m.document_mask = False  # packed rows attend across files (Megatron-LM's default): cuDNN
    # then needs no dense [B, H, S, S] mask; the same for every arm
    config.moe.dispatch = "dropless"  # nothing dropped, so capacity is not a confound
    config.moe.group_size = 1024
    d.text_files = ""  # set by experiments/moe_vs_dense.py (--corpus) or --config.data.*
    d.document_split = "file"  # one document per source file, split train/held-out by file
    d.validation_fraction = 0.02
    d.undecodable_files = "skip"  # a few Latin-1 files sit among installed packages
    d.max_document_chars = 100_000  # generated files (tables, stubs) of up to MBs would fill
    # runs of consecutive batches and most of a held-out sample; ~24% of the bytes, 1.5% of files
    d.spm_model_type = "bpe"
    d.pretokenize = True  # all cores tokenise once; the input loop only packs rows
    t.batch_size, t.eval_batch_size, t.seq_len = 32, 32, 1024
    t.steps = 1200
    t.optimizer = "adamw"
    t.learning_rate = 1e-3
    t.warmup_steps = 150
    t.decay = "cosine"
    t.min_learning_rate = 1e-4
    t.weight_decay = 0.1
    t.log_every = 25
    t.eval_every = 150
    t.eval_batches = 40  # 1.3M held-out tokens per evaluation
    t.checkpoint_every = -1  # arms keep no checkpoint unless the study asks (--keep=...)


def _tiny_scale(config: ml_collections.ConfigDict) -> None:
    """The same arms on the tiny CPU model and the embedded corpus (tests, smoke runs)."""
    m, t = config.model, config.train
    m.num_layers, m.embed_dim, m.mlp_dim, m.num_heads, m.head_dim = 2, 64, 256, 2, 32
    m.vocab_size, m.max_len, m.dtype = 512, 64, "float32"
    config.moe.dispatch = "dropless"
    config.moe.group_size = 128
    t.batch_size, t.eval_batch_size, t.seq_len = 8, 8, 64
    t.steps, t.optimizer, t.learning_rate, t.warmup_steps = 20, "adamw", 3e-3, 5
    t.decay, t.log_every, t.eval_every, t.eval_batches = "cosine", 5, 10, 2
    t.checkpoint_every = -1
    t.progress_bar = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = parse_variant(arg)
    config = get_base_config()
    (_study_scale if variant["scale"] == "h200" else _tiny_scale)(config)
    experts, router, k, width = ARMS[variant["arm"]]
    e = config.moe
    e.num_experts, e.router, e.num_selected = experts, router, k
    e.expert_mlp_dim = int(config.model.mlp_dim * width) if experts else 0
    config.seed = variant["seed"]
    config.data.shuffle_seed = 0  # the same data order for every arm and seed
    if variant["steps"]:
        config.train.steps = variant["steps"]
    config.study = ml_collections.ConfigDict()  # what the study driver reads back
    config.study.arm = variant["arm"]
    config.study.scale = variant["scale"]
    return config
