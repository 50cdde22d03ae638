"""Trains a glam_jax model; the program is glam_jax/commands/train.py (also `glam-train`).

python experiments/train.py --config=configs/glam_tiny.py --workdir=/tmp/glam_tiny
python experiments/train.py --config=configs/glam.py:size=1_7b --workdir=... \
    --config.mesh.shape="(-1,8,1)" --config.data.text_files=/data/*.txt
"""

from glam_jax.commands import train

if __name__ == "__main__":
    train.entry()
