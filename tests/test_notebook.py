"""The notebook's code cells run top to bottom (in a fresh interpreter, as Colab would)."""

import json
import os
import subprocess
import sys

from tests.helpers import ROOT


def test_explore_notebook_runs(tmp_path):
    with open(os.path.join(ROOT, "notebooks", "explore_glam.ipynb")) as f:
        notebook = json.load(f)
    cells = ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(cells))
    env = dict(os.environ, GLAM_NOTEBOOK_WORKDIR=str(tmp_path), MPLBACKEND="Agg", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cross-entropy" in proc.stdout and "MoE layer 1" in proc.stdout
    assert "ROMEO:" in proc.stdout
