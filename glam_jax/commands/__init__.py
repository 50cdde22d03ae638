"""The command-line programs: `glam-train`, `glam-eval`, `glam-generate` (installed console
scripts, setup.py) and `experiments/{train,eval,generate}.py` (the same programs in a checkout).

Each module defines its absl flags when imported and has `main(argv)` plus `entry()`, the
console-script target; import one per process (two would define `--config` twice).
`glam-param-count` is glam_jax/param_count.py; `glam-lm-eval` (lm_eval.py) wraps lm-eval's.
"""
