"""Presets live in the library; every config reads its variant with one parser."""

import ast
import os
import runpy
import subprocess
import sys

import pytest
import setuptools

from configs import glam, glam_gpu_bench, glam_tiny, mixtral
from glam_jax.presets.variants import VariantError, parse_variant
from tests.helpers import ROOT, assert_one_sentence

# Variant strings the README, docs/performance.md and bench defaults use.
BENCH_VARIANTS = {
    "moe+experts=64+layers=4+unrolled+dispatch=dropless+batch=8": dict(
        kind="moe", experts=64, layers=4, unrolled=True, dispatch="dropless", batch=8
    ),
    "moe+unrolled+dispatch=dropless+batch=16": dict(unrolled=True, batch=16),
    "dense+docmask": dict(kind="dense", docmask=True),
    "moe+mesh=1x4x1+batch=32": dict(mesh=(1, 4, 1), batch=32),
    "moe+dispatch=dropless+gmm=mgpu+glu=unfused": dict(gmm="mgpu", glu="unfused"),
}


@pytest.mark.parametrize("arg", list(BENCH_VARIANTS))
def test_bench_variants_still_read_the_same(arg):
    variant = glam_gpu_bench.parse(arg)
    for key, want in BENCH_VARIANTS[arg].items():
        assert variant[key] == want, (arg, key)


def test_size_variants_big_vision_style():
    assert glam.get_config("size=1_7b,experts=32").moe.num_experts == 32
    assert glam.get_config("1_7b").model.num_layers == 24  # bare word: the positional size
    assert glam.get_config(None).model.num_layers == 12  # 0_1b
    assert mixtral.get_config("size=8x7b").model.num_layers == 32
    tiny = glam_tiny.get_config("router=switch_top1,k=1,dispatch=dropless")
    assert (tiny.moe.router, tiny.moe.num_selected, tiny.moe.dispatch) == (
        "switch_top1",
        1,
        "dropless",
    )
    assert glam_tiny.get_config().to_dict() == glam_tiny.get_config("").to_dict()


@pytest.mark.parametrize(
    "load, arg, match",
    [
        (glam.get_config, "foo=1_7b", "GLaM variant 'foo=1_7b' is not known; valid: size=, "),
        (glam.get_config, "size=3b", "GLaM size '3b' is not known"),
        (mixtral.get_config, "sizes=tiny", "Mixtral variant 'sizes=tiny' is not known"),
        (glam_gpu_bench.parse, "moe+batch=big", "bench variant batch='big' is not a valid int"),
        (glam_gpu_bench.parse, "glu=maybe", r"glu='maybe' is not valid; valid: \['fused'"),
        (glam_tiny.get_config, "unrolled", "glam_tiny variant 'unrolled' is not known"),
    ],
)
def test_unknown_variant_keys_are_refused_in_one_sentence(load, arg, match):
    with pytest.raises(VariantError, match=match) as err:
        load(arg)
    assert_one_sentence(str(err.value))


def test_parser_reads_values_by_the_defaults_type():
    defaults = dict(n=1, x=0.5, flag=False, mesh=(-1, 1, 1), name="a")
    got = parse_variant("n=3,x=0.25,flag,mesh=2x2x1,name=b", defaults)
    assert got == dict(n=3, x=0.25, flag=True, mesh=(2, 2, 1), name="b")
    assert parse_variant("flag=false", defaults)["flag"] is False


def test_library_imports_no_configs_or_experiments_and_setup_installs_only_it(monkeypatch):
    for folder, _, files in os.walk(os.path.join(ROOT, "glam_jax")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                mods = []
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    mods = [node.module]
                bad = [m for m in mods if m.split(".")[0] in ("configs", "experiments", "tests")]
                assert not bad, (path, bad)
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    assert seen["packages"] and all(p.split(".")[0] == "glam_jax" for p in seen["packages"])
    assert "glam_jax.presets" in seen["packages"] and "glam_jax.moe" in seen["packages"]
    assert "corpus/*.txt" in seen["package_data"]["glam_jax.data"]


def test_every_config_file_loads_outside_the_checkout(tmp_path):
    """experiments/train.py loads a config file by path, with the checkout's root not on
    sys.path (only glam_jax is installed), so no config may import the `configs` package."""
    script = (
        "import glob, importlib.util, sys\n"
        f"assert {str(ROOT)!r} not in sys.path\n"
        f"for path in sorted(glob.glob({os.path.join(ROOT, 'configs', '*.py')!r})):\n"
        "    if path.endswith('__init__.py'):\n"
        "        continue\n"
        "    spec = importlib.util.spec_from_file_location('config_file', path)\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "    module.get_config()\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-1500:]
