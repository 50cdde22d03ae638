"""Does MoE pay off? Dense and MoE arms at equal activated FLOPs per token, one command.

    python experiments/moe_vs_dense.py --workdir=/tmp/mvd --runs=dense,moe16,moe64,switch16
    python experiments/moe_vs_dense.py --report_only --out=docs/research   # rebuild on CPU

Each run (`arm` or `arm:seed`, arms from configs/moe_vs_dense.py) trains in its own process
with experiments/train.py, so one arm's memory never meets the next one's. Every run shares
one data cache under --workdir: the corpus, the tokenizer and the pre-tokenised splits are
prepared once, first (`--prepare_only` stops there and reports how long that took). The
corpus defaults to the Python sources of the running interpreter's installed packages.

The study JSON (`<out>/moe_vs_dense.json`) keeps every run ever reported into it, keyed by
(arm, seed), so runs measured at different times combine; the plots and the markdown table are
rebuilt from that JSON alone (`--report_only`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from absl import app, flags

from glam_jax import cli
from glam_jax.study_report import (
    StudyError,
    arm_record,
    distill_record,
    load_study,
    merge_arm,
    merge_distill,
    merge_rerun,
    run_name,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]

_CONFIG = flags.DEFINE_string("config", str(REPO / "configs/moe_vs_dense.py"), "Study config.")
_SCALE = flags.DEFINE_string("scale", "h200", "Config scale: h200 (the study) or tiny (smoke).")
_RUNS = flags.DEFINE_list("runs", ["dense", "moe16"], "Runs as arm or arm:seed.")
_STEPS = flags.DEFINE_integer("steps", 0, "Training steps of every run (0 = the config's).")
_CORPUS = flags.DEFINE_string(
    "corpus", "", "Text files or globs ('' = **/*.py of this interpreter's site-packages)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Study root: one workdir per run + data cache.")
_OUT = flags.DEFINE_string("out", str(REPO / "docs/research"), "JSON, plots and table go here.")
_KEEP = flags.DEFINE_list("keep", [], "Runs (arm:seed) that keep their final checkpoint.")
_SET = flags.DEFINE_multi_string("set", [], "key=value config overrides for every run.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rebuild plots/table from the JSON.")
_MERGE = flags.DEFINE_list(
    "merge", [], "Study JSON files whose runs join this study's (later files win per run)."
)
_RERUNS = flags.DEFINE_list(
    "merge_reruns", [], "Study JSON files whose runs repeat this study's (kept beside them)."
)
_DISTILL = flags.DEFINE_list(
    "distill_results",
    [],
    "distill_result.json files of experiments/distill.py (a metrics.jsonl beside one gives "
    "the student's curve).",
)
_PREPARE_ONLY = flags.DEFINE_bool("prepare_only", False, "Prepare the data, report, stop.")
_MEASURE_PIPELINE = flags.DEFINE_integer(
    "measure_pipeline", 0, "Also time this many batches of the on-the-fly and cached pipelines."
)


_CALLER_PLATFORMS = ""  # JAX_PLATFORMS as the caller set it, restored for the runs


# ---- runs and configs ----------------------------------------------------------------------


def parse_run(spec: str) -> tuple[str, int]:
    """'moe16' -> ('moe16', 0); 'moe16:1' -> ('moe16', 1)."""
    arm, _, seed = spec.partition(":")
    try:
        return arm, int(seed or 0)
    except ValueError:
        raise StudyError(f"--runs entry {spec!r} is not arm or arm:seed.") from None


def variant(arm: str, seed: int, scale: str, steps: int) -> str:
    return f"arm={arm},seed={seed},scale={scale}" + (f",steps={steps}" if steps else "")


def load_config(path: str, arg: str):
    """The study config file's get_config(arg), as experiments/train.py would build it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO))  # a user's config file may import `configs.*`
    spec.loader.exec_module(module)
    try:
        return module.get_config(arg)
    except ValueError as err:
        raise StudyError(str(err)) from None


def apply_overrides(config, overrides: list[str], corpus: str, cache_dir: str | None):
    """The --set key=value overrides, plus the corpus and shared cache, as train.py gets them
    (train.py parses the same `--config.KEY=VALUE` strings with ml_collections)."""
    import ast

    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise StudyError(f"--set {item!r} is not key=value.")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        *parents, name = key.split(".")
        target = config
        for part in parents:
            target = target.get(part) if hasattr(target, "get") else None
        if target is None or not hasattr(target, "get") or name not in target:
            raise StudyError(f"--set {key!r} is not a field of the study config.")
        target[name] = parsed
    if corpus:
        config.data.text_files = corpus
    if cache_dir:
        config.data.cache_dir = cache_dir
    return config


def default_corpus() -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], "**", "*.py")


def run_command(arm: str, seed: int, root: Path, corpus: str) -> list[str]:
    """The experiments/train.py command line of one run (recorded in the JSON as well)."""
    keep = f"{arm}:{seed}" in _KEEP.value or (seed == 0 and arm in _KEEP.value)
    cmd = [
        sys.executable,
        str(REPO / "experiments/train.py"),
        f"--config={_CONFIG.value}:{variant(arm, seed, _SCALE.value, _STEPS.value)}",
        f"--workdir={root / run_name(arm, seed)}",
        f"--config.data.cache_dir={root / 'data'}",
    ]
    if corpus:
        cmd.append(f"--config.data.text_files={corpus}")
    if keep:
        cmd.append("--config.train.checkpoint_every=0")
    cmd += [f"--config.{item}" for item in _SET.value]
    return cmd


# ---- data: manifest, preparation, pipeline speed --------------------------------------------


def manifest(corpus: str) -> dict:
    """File count, bytes and the sha256 of the sorted file list of the corpus."""
    from glam_jax.data import text_corpus

    files = sorted(str(p) for p in text_corpus.resolve_text_files(corpus))
    return {
        "corpus": corpus,
        "files": len(files),
        "bytes": sum(os.path.getsize(f) for f in files),
        "sha256_sorted_file_list": hashlib.sha256("\n".join(files).encode()).hexdigest(),
    }


def _time_batches(iterator, batches: int) -> float:
    """Tokens per second of `batches` batches (after one warm-up batch)."""
    first = next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * first["inputs"].size / (time.perf_counter() - start)


def prepare(config, measure_batches: int) -> dict:
    """Prepares corpus, tokenizer and token cache once, timing each stage."""
    from glam_jax.data import pipeline

    data, cache = config.data, config.data.cache_dir
    out: dict = {"cpu_count": os.cpu_count()}
    start = time.perf_counter()
    corpus = pipeline.open_corpus(data, cache)
    out["corpus_prepare_s"] = time.perf_counter() - start
    out["train_documents"], out["eval_documents"] = len(corpus.train), len(corpus.validation)
    start = time.perf_counter()
    data.pretokenize = False  # the tokenizer alone first (the corpus is cached now)
    bundle = pipeline.build_datasets(config, cache, process_index=0, process_count=1)
    out["tokenizer_s"] = time.perf_counter() - start
    start = time.perf_counter()
    data.pretokenize = True
    train, validation, _ = pipeline.document_sources(
        corpus, bundle.tokenizer, pipeline.DocumentTokenizer(bundle.tokenizer), data, cache
    )
    out["pretokenize_s"] = time.perf_counter() - start
    out["train_tokens"], out["validation_tokens"] = train.num_tokens, validation.num_tokens
    out["tokens_per_s_pretokenize"] = (train.num_tokens + validation.num_tokens) / out[
        "pretokenize_s"
    ]
    if measure_batches:
        out["tokens_per_s_on_the_fly"] = _time_batches(bundle.train_iter, measure_batches)
        cached = pipeline.build_datasets(config, cache, process_index=0, process_count=1)
        out["tokens_per_s_cached_rows"] = _time_batches(cached.train_iter, measure_batches)
    return out


# ---- main -----------------------------------------------------------------------------------


def run_study() -> None:
    out = Path(_OUT.value)
    study = load_study(out)
    for path in _MERGE.value:
        if not os.path.isfile(path):
            raise StudyError(f"--merge names {path!r}, which is not an existing file.")
        for record in json.loads(Path(path).read_text()).get("arms", []):
            merge_arm(study, record)
    for path in _RERUNS.value:
        if not os.path.isfile(path):
            raise StudyError(f"--merge_reruns names {path!r}, which is not an existing file.")
        for record in json.loads(Path(path).read_text()).get("arms", []):
            merge_rerun(study, record)
    for path in _DISTILL.value:
        if not os.path.isfile(path):
            raise StudyError(f"--distill_results names {path!r}, which is not an existing file.")
        result = json.loads(Path(path).read_text())
        merge_distill(study, distill_record(result, Path(path).parent / "metrics.jsonl"))
    if _REPORT_ONLY.value:
        write_report(study, out)
        print(f"Rebuilt the report in {out} from {len(study['arms'])} runs.")
        return
    if not _WORKDIR.value:
        raise StudyError("--workdir is required unless --report_only is given.")
    root = Path(_WORKDIR.value).resolve()
    if root.exists() and not root.is_dir():
        raise StudyError(f"--workdir={root} is an existing file; name a directory.")
    runs = [parse_run(spec) for spec in _RUNS.value]
    cache = str(root / "data")
    configs = {
        run: apply_overrides(
            load_config(_CONFIG.value, variant(*run, _SCALE.value, _STEPS.value)),
            _SET.value,
            "",
            cache,
        )
        for run in runs
    }
    first = configs[runs[0]]
    # The tiny scale reads the embedded corpus and a TFDS catalog dataset needs no files; the
    # study's default corpus is this interpreter's installed Python sources.
    default = "" if first.data.tfds_name or _SCALE.value == "tiny" else default_corpus()
    corpus = _CORPUS.value or default
    for config in configs.values():
        config.data.text_files = corpus or config.data.text_files
    study.setdefault("recipe", {})
    if corpus:
        study["manifest"] = manifest(corpus)
        start = time.perf_counter()
        study["prepare"] = prepare(first.copy_and_resolve_references(), _MEASURE_PIPELINE.value)
        study["prepare"]["total_s"] = time.perf_counter() - start
        print("prepared:", json.dumps(study["prepare"]), flush=True)
    if _PREPARE_ONLY.value:
        write_report(study, out)
        return
    env = dict(os.environ)  # runs see the platforms the caller gave, not the driver's CPU
    env.pop("JAX_PLATFORMS", None)
    if _CALLER_PLATFORMS:
        env["JAX_PLATFORMS"] = _CALLER_PLATFORMS
    for arm, seed in runs:
        cmd = run_command(arm, seed, root, corpus)
        print("running:", " ".join(cmd), flush=True)
        start = time.perf_counter()
        result = subprocess.run(cmd, env=env, cwd=REPO)
        if result.returncode:
            raise StudyError(
                f"run {run_name(arm, seed)} failed with exit code {result.returncode}."
            )
        record = arm_record(
            arm,
            seed,
            configs[(arm, seed)],
            root / run_name(arm, seed),
            time.perf_counter() - start,
            cmd,
        )
        merge_arm(study, record)
        study["recipe"][_SCALE.value] = _recipe(first)
        write_report(study, out)  # after every run, so a cut-off study keeps what finished
        print(
            f"{run_name(arm, seed)}: held-out loss {record['final_eval_loss']:.4f}, "
            f"step {record['step_time_s'] * 1e3:.1f} ms, MFU {record['mfu']}",
            flush=True,
        )


def _recipe(config) -> dict:
    """What every arm shares, for the report."""
    return {
        "model": {
            k: config.model[k]
            for k in (
                "num_layers",
                "embed_dim",
                "mlp_dim",
                "num_heads",
                "head_dim",
                "vocab_size",
                "dtype",
            )
        },
        "train": config.train.to_dict(),
        "data": {
            k: config.data[k]
            for k in ("document_split", "validation_fraction", "spm_model_type", "pretokenize")
        },
        "moe": {
            k: config.moe[k]
            for k in ("every", "dispatch", "aux_loss_weight", "z_loss_weight", "router_init_scale")
        },
    }


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    global _CALLER_PLATFORMS
    _CALLER_PLATFORMS = os.environ.get("JAX_PLATFORMS", "")
    os.environ["JAX_PLATFORMS"] = "cpu"  # the driver only counts and prepares; runs get the GPU
    run_study()


if __name__ == "__main__":
    cli.run(main)  # a StudyError or GlamError becomes one `error:` line
