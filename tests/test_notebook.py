"""The Colab notebook runs end to end in its smoke mode (so it cannot rot).

Code cells are executed in order in one fresh Python process; shell lines
("!...", Colab-only installs) are skipped: the test machine has the project
installed already.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "launch" / "colab_cifar10.ipynb"


def notebook_as_script() -> str:
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  lines = []
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    for line in "".join(cell["source"]).splitlines():
      if not line.lstrip().startswith(("!", "%")):
        lines.append(line)
  return "\n".join(lines) + "\n"


@pytest.mark.skipif(not pathlib.Path("/usr/share/datasets/fashion-mnist")
                    .exists(), reason="apt-get install -y dataset-fashion-mnist")
def test_notebook_smoke_mode(tmp_path):
  script = tmp_path / "notebook.py"
  script.write_text(notebook_as_script())
  workdir = tmp_path / "run"
  env = {**os.environ, "BAYESNCL_NOTEBOOK_SMOKE": "1",
         "BAYESNCL_PROJECT_DIR": str(ROOT), "BAYESNCL_WORKDIR": str(workdir),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "smoke mode" in proc.stdout
  report = json.loads((workdir / "eval" / "report.json").read_text())
  assert 0.0 <= report["linear_top1"] <= 1.0
  assert list((workdir / "eval").glob("*.png"))
