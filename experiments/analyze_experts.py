"""What do the experts learn? Routes labelled text through a trained MoE and writes, per MoE
layer, the experts' distribution per domain, consecutive-token repeat rates against chance,
mutual information of the expert with token class and with domain, and each expert's top tokens.

python experiments/analyze_experts.py --config=configs/glam_tiny_multidomain.py \
    --workdir=/tmp/glam_multidomain --out=/tmp/experts \
    --text_files="code=/usr/lib/python3.11/json/*.py,prose=/path/shakespeare.txt"
python experiments/analyze_experts.py --hf_dir=/data/Mixtral-8x7B-v0.1 \
    --tokenizer=.../mistral_common/data/tokenizer.model.v1 --text_files=... --out=...

Writes summary.json, expert_share_heatmap.png, repeat_rate.png, mutual_information.png and
summary.md to --out. With --workdir, --config is the run's config (any glam_jax run works);
with --hf_dir it only contributes dtypes, the attention kernel and the mesh.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags, logging
from ml_collections import config_flags

from glam_jax import cli, config_checks, gpu_defaults, pretrained, sharding, steps
from glam_jax.analysis import analyze, parse_text_files, regex_class, select_classes, write_report
from glam_jax.analysis.collect import check_analysable
from glam_jax.errors import GlamError

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "The run's config file (optional :variant); required with --workdir.",
    lock_config=False,
)
_WORKDIR = flags.DEFINE_string("workdir", "", "A glam_jax training workdir to restore.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: latest).")
_HF_DIR = flags.DEFINE_string("hf_dir", "", "A Hugging Face Mixtral directory to import.")
_RANDOM_INIT = flags.DEFINE_bool(
    "random_init",
    False,
    "Fresh random weights of the --workdir's config (a baseline: what "
    "routing looks like before training); the workdir still gives the tokenizer.",
)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "SentencePiece .model (else the source's).")
_TEXT_FILES = flags.DEFINE_string(
    "text_files", "", "Labelled text: domain=GLOB,domain=GLOB (one domain per glob)."
)
_OUT = flags.DEFINE_string("out", "", "Folder for summary.json, figures and summary.md.")
_MAX_TOKENS = flags.DEFINE_integer(
    "max_tokens_per_domain", 50_000, "Tokens read from each domain (0 = all of its files)."
)
_ROWS = flags.DEFINE_integer("rows", 16, "Rows per batch (a multiple of the mesh's batch shards).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 0, "Tokens per row (0 = the config's train.seq_len).")
_CLASSES = flags.DEFINE_list(
    "token_classes", None, "Built-in token classes, in priority order (default: all)."
)
_EXTRA = flags.DEFINE_multi_string(
    "token_class", [], "An extra class as name=REGEX on the piece's text (tried first)."
)
_TOP_TOKENS = flags.DEFINE_integer("top_tokens", 10, "Top tokens listed per expert.")
_MESH = flags.DEFINE_list("mesh", [], "Mesh (data,expert,model), e.g. 1,8,1; default config's.")
_TITLE = flags.DEFINE_string("title", "Routing analysis", "Title of summary.md.")


def load_model():
    """(config, params, mesh, tokenizer path) of --workdir or --hf_dir."""
    if bool(_WORKDIR.value) == bool(_HF_DIR.value):
        raise GlamError("pass exactly one of --workdir and --hf_dir.")
    if _RANDOM_INIT.value and _HF_DIR.value:
        raise GlamError(
            "--random_init goes with --workdir (its config and tokenizer), not --hf_dir."
        )
    # With --hf_dir, --config contributes only dtypes, the attention kernel and the mesh.
    config = pretrained.config_for_source(_CONFIG.value, _HF_DIR.value)
    if config is None:
        raise GlamError("--config is required with --workdir (the config the run trained with).")
    config_checks.check_model(config)
    check_analysable(config)  # before restoring anything large
    shape = tuple(int(s) for s in _MESH.value) if _MESH.value else tuple(config.mesh.shape)
    mesh = sharding.make_mesh(sharding.mesh_shape(shape, jax.device_count()))
    tok = _TOKENIZER.value
    if _HF_DIR.value:
        config, params = pretrained.params_from_hf(_HF_DIR.value, mesh, config)
        tok = tok or pretrained.tokenizer_path(None, hf_dir=_HF_DIR.value)
    elif _RANDOM_INIT.value:
        model = steps.build_model(config)
        shardings = sharding.named_shardings(mesh, steps.param_partition_specs(model, config))
        ids = jnp.zeros((1, config.train.seq_len), jnp.int32)
        with sharding.use_mesh(mesh):
            params = jax.jit(
                lambda r: nn.unbox(model.init({"params": r}, ids)["params"]),
                out_shardings=shardings,
            )(jax.random.PRNGKey(config.seed))
        tok = tok or pretrained.tokenizer_path(config, workdir=_WORKDIR.value)
    else:
        params, step = pretrained.params_from_workdir(config, _WORKDIR.value, mesh, _STEP.value)
        logging.info("restored step %d", step)
        tok = tok or pretrained.tokenizer_path(config, workdir=_WORKDIR.value)
    return config, params, mesh, tok


def run() -> dict:
    if not _OUT.value:
        raise GlamError("--out is required: the folder the summary and figures go to.")
    domains = parse_text_files(_TEXT_FILES.value)
    classes = select_classes(_CLASSES.value, [regex_class(spec) for spec in _EXTRA.value])
    config, params, mesh, tok_path = load_model()
    tokenizer = pretrained.tokenizer(tok_path)
    summary, _ = analyze(
        config,
        params,
        mesh,
        tokenizer,
        domains,
        classes=classes,
        rows=_ROWS.value,
        length=_SEQ_LEN.value,
        max_tokens_per_domain=_MAX_TOKENS.value,
        top_tokens=_TOP_TOKENS.value,
    )
    summary["source"] = {
        "workdir": _WORKDIR.value,
        "hf_dir": _HF_DIR.value,
        "step": "random_init" if _RANDOM_INIT.value else _STEP.value,
        "tokenizer": tok_path,
        "text_files": {d.name: list(d.files) for d in domains},
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
    }
    paths = write_report(summary, _OUT.value, _TITLE.value)
    print("\n".join(paths))
    return summary


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    summary = run()
    keys = ("repeat_rate_top1", "repeat_rate_chance", "mi_token_class", "mi_domain")
    print(json.dumps({key: [round(v, 4) for v in summary[key]] for key in keys}))
    print(f"{summary['tokens']} tokens in {summary['seconds']:.1f} s")


if __name__ == "__main__":
    gpu_defaults.apply()  # XLA/CUDA settings for GPU hosts; nothing elsewhere
    cli.run(main)  # a GlamError becomes one `error:` line
