"""Exports a glam_jax model of a Hugging Face family (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) to a
Hugging Face directory (config.json + safetensors shards in the family's hub layout).

python experiments/export_hf.py --config=configs/mixtral.py:size=tiny --workdir=/tmp/mixtral_tiny \
    --out=/tmp/mixtral_tiny_hf
python experiments/export_hf.py --config=configs/mixtral.py:size=tiny --out=/tmp/x --logits
/work/venv-hf/bin/python experiments/make_hf_golden.py --check_export=/tmp/x

Without --workdir the weights are random (seeded). --logits also writes glam_jax_logits.npz
(a random batch and glam_jax's float32 logits for it), which make_hf_golden.py --check_export
compares with what transformers computes from the exported files.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from ml_collections import config_flags

from glam_jax import cli, hf_checkpoint, pretrained, sharding
from glam_jax.model import Transformer, frozen

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A config of a Hugging Face family (Mixtral, OLMoE, Qwen MoE)."
)
_WORKDIR = flags.DEFINE_string("workdir", "", "Training workdir to export (else random).")
_OUT = flags.DEFINE_string("out", None, "Directory to write.")
_DTYPE = flags.DEFINE_string("dtype", "", "Tensor dtype to write (default: param dtype).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of random weights and of the --logits batch.")
_LOGITS = flags.DEFINE_bool("logits", False, "Also write glam_jax_logits.npz.")
flags.mark_flags_as_required(["config", "out"])


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    hf_checkpoint.family_for(config)
    mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    model = Transformer(frozen(config))
    if _WORKDIR.value:
        params, _ = pretrained.params_from_workdir(config, _WORKDIR.value, mesh)
    else:
        ids = jnp.zeros((1, 1), jnp.int32)
        init = jax.jit(lambda r: nn.unbox(model.init({"params": r}, ids)["params"]))
        params = init(jax.random.PRNGKey(_SEED.value))
    names = hf_checkpoint.save(params, config, _OUT.value, _DTYPE.value or None)
    if _LOGITS.value:
        rng = np.random.RandomState(_SEED.value)
        ids = rng.randint(0, config.model.vocab_size, (2, 16)).astype(np.int32)
        logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
        np.savez(
            os.path.join(_OUT.value, "glam_jax_logits.npz"),
            input_ids=ids,
            logits=np.asarray(logits, np.float32),
        )
    print(f"wrote {len(names)} shards and config.json to {_OUT.value}")


if __name__ == "__main__":
    cli.run(main)
