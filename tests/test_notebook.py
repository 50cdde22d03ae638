"""The notebook's code cells run top to bottom (in a fresh interpreter, as Colab would)."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def run_notebook(name: str, tmp_path, timeout: int, **env: str) -> subprocess.CompletedProcess:
    """The notebook's code cells as one script in a fresh interpreter, its workdir in tmp_path."""
    with open(os.path.join(ROOT, "notebooks", name)) as f:
        notebook = json.load(f)
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(cells))
    env = dict(
        os.environ, GLAM_NOTEBOOK_WORKDIR=str(tmp_path), MPLBACKEND="Agg", PYTHONPATH=ROOT, **env
    )
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_explore_notebook_runs(tmp_path):
    """Every cell, with 10 training steps instead of the notebook's 60."""
    proc = run_notebook("explore_glam.ipynb", tmp_path, timeout=600, GLAM_NOTEBOOK_STEPS="10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cross-entropy" in proc.stdout and "MoE layer 1" in proc.stdout
    assert "ROMEO:" in proc.stdout


def test_what_experts_learn_notebook_runs(tmp_path):
    """The analysis notebook with a 10-step model and a few thousand tokens per domain (the
    full run takes the config's 600 steps); WikiText-2 from ../shared/data when it is there."""
    shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
    wikitext = os.path.isfile(os.path.join(shared, "wikitext2_test.txt"))
    proc = run_notebook(
        "what_experts_learn.ipynb",
        tmp_path,
        timeout=900,
        GLAM_NOTEBOOK_STEPS="10",
        GLAM_NOTEBOOK_TOKENS="3000",
        GLAM_WIKITEXT_DIR=shared if wikitext else "",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens analysed in" in proc.stdout and "I(expert; class)" in proc.stdout
    summary = json.loads((tmp_path / "analysis" / "summary.json").read_text())
    assert summary["domains"][:2] == ["prose", "code"] and summary["tokens"] > 5000
