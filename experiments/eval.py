"""Evaluates a checkpoint: held-out loss, perplexity and bits per character; the program is
glam_jax/commands/eval.py (also `glam-eval`).

python experiments/eval.py --config=configs/glam_tiny.py --workdir=/tmp/glam_tiny [--step=N]
"""

from glam_jax.commands import eval as eval_command

if __name__ == "__main__":
    eval_command.entry()
