"""The examples run: the notebook's code cells in order, the converter demo script."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_notebook_cells_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMOE_MLX_CACHE", str(tmp_path))
    notebook = json.loads((EXAMPLES / "stream_in_jupyter.ipynb").read_text())
    namespace, printed = {}, io.StringIO()
    with contextlib.redirect_stdout(printed):
        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                exec(compile("".join(cell["source"]), "notebook", "exec"), namespace)
    stats = namespace["stats"]
    assert stats["misses"] > 0 and stats["pool_bytes"] <= namespace["budget"]
    assert "tok/s" in printed.getvalue() and "experts:" in printed.getvalue()


def test_convert_demo_script(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "convert_demo.py"), "--workdir", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "OK," in result.stdout and "streamed experts" in result.stdout
