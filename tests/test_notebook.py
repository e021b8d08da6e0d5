"""The Colab notebook runs end to end in its smoke mode (so it cannot rot).

Every code cell is executed in order in one real Jupyter (IPython) kernel,
as Colab runs them, the install cell included: it unpacks the code from a zip of this repository
(the path a user without a git URL takes) into a fresh folder, checks the
requirement set it would install and prints the one pip command, which is
checked here (smoke mode does not run pip). Training and evaluation then run
from the unpacked copy. The notebook has no shell ("!") lines.
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "launch" / "colab_cifar10.ipynb"


def notebook_cells() -> list[str]:
  nb = json.loads(NOTEBOOK.read_text())
  assert nb["nbformat"] == 4
  return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def notebook_namespace(env: dict) -> dict:
  """Runs the first code cell's definitions (not its actions) in-process."""
  first = notebook_cells()[0]
  defs = first[:first.index("print(get_code())")]
  saved = dict(os.environ)
  os.environ.update(env)
  try:
    namespace = {}
    exec(compile(defs, "cell1", "exec"), namespace)  # pylint: disable=exec-used
    return namespace
  finally:
    os.environ.clear()
    os.environ.update(saved)


def repo_zip(path: pathlib.Path, prefix: str = "") -> pathlib.Path:
  """A zip of the working tree's files (tracked and untracked, not ignored),
  like `git archive`."""
  files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
  with zipfile.ZipFile(path, "w") as archive:
    for name in files:
      if (ROOT / name).is_file():
        archive.write(ROOT / name, prefix + name)
  return path


def test_notebook_has_no_placeholder_and_no_shell_lines():
  text = NOTEBOOK.read_text()
  assert "YOUR_ORG" not in text and "example.com" not in text
  assert 'REPO_URL = ""' in notebook_cells()[0]
  for cell in notebook_cells():
    for line in cell.splitlines():
      assert not line.lstrip().startswith(("!", "%")), line
    # The kernel imported numpy (and more) before the install cell changed
    # them: it must not import what pip installs, or Colab needs a restart.
    imports = re.findall(r"^\s*(?:import|from)\s+(numpy|jax|tensorflow_datasets"
                         r"|tensorflow|grain|orbax|bayesncl_jax)\b", cell, re.M)
    assert not imports, (imports, cell[:200])


def test_install_is_one_consistent_pip_call(tmp_path):
  ns = notebook_namespace({"BAYESNCL_PROJECT_DIR": str(ROOT)})
  args = ns["requirement_set"]()
  pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$",
                         (ROOT / "requirements.txt").read_text(), re.M))
  assert args == ["-r", str(ROOT / "requirements.txt"),
                  f"jax[cuda12]=={pins['jax']}"]
  assert pins["jax"] == pins["jaxlib"]
  # A requirements file pinning jax and jaxlib apart is refused.
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "requirements.txt").write_text("jax==0.10.2\njaxlib==0.10.1\n")
  ns = notebook_namespace({"BAYESNCL_PROJECT_DIR": str(bad)})
  with pytest.raises(SystemExit, match="jax and jaxlib differently"):
    ns["requirement_set"]()


def test_get_code_from_a_zip_or_a_clear_error(tmp_path):
  for prefix in ("", "bayesncl_jax-main/"):
    project = tmp_path / prefix.strip("/") / "p" / "bayesncl_jax"
    project.parent.mkdir(parents=True)
    zipped = repo_zip(tmp_path / f"code{len(prefix)}.zip", prefix)
    ns = notebook_namespace({"BAYESNCL_PROJECT_DIR": str(project),
                             "BAYESNCL_ZIP": str(zipped)})
    assert ns["get_code"]().startswith("unpacked")
    assert (project / "bayesncl_jax" / "train.py").exists()
    assert ns["get_code"]().startswith("kept")
  ns = notebook_namespace({"BAYESNCL_PROJECT_DIR": str(tmp_path / "none"),
                           "BAYESNCL_ZIP": str(tmp_path / "missing.zip")})
  with pytest.raises(SystemExit, match="set REPO_URL"):
    ns["get_code"]()
  ns["REPO_URL"] = str(tmp_path / "not-a-repo")
  with pytest.raises(SystemExit, match="Check REPO_URL"):
    ns["get_code"]()


def test_dtype_follows_the_gpu():
  cell = notebook_cells()[1]
  defs = cell[cell.index("def compute_dtype"):cell.index("GPU = gpu_name()")]
  ns = {}
  exec(defs, ns)  # pylint: disable=exec-used
  for gpu, dtype in [("Tesla T4", "float32"), ("Tesla V100-SXM2-16GB",
                                               "float32"),
                     ("NVIDIA A100-SXM4-40GB", "bfloat16"),
                     ("NVIDIA L4", "bfloat16"),
                     ("NVIDIA H100 80GB HBM3", "bfloat16"), ("", "float32")]:
    assert ns["compute_dtype"](gpu) == dtype, gpu


@pytest.mark.slow
@pytest.mark.skipif(not pathlib.Path("/usr/share/datasets/fashion-mnist")
                    .exists(), reason="apt-get install -y dataset-fashion-mnist")
def test_notebook_runs_top_to_bottom_in_a_jupyter_kernel(tmp_path,
                                                        monkeypatch):
  """Every cell in order in a real IPython kernel (nbclient), as Colab runs
  them: one kernel for all cells, so a package the install cell changes
  but the kernel had already imported would show here. The kernel must not
  import jax, TFDS, grain or orbax itself (every step that needs them runs
  as a subprocess): then no runtime restart is needed after the install."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  project = tmp_path / "content" / "bayesncl_jax"
  project.parent.mkdir()
  env = {"BAYESNCL_NOTEBOOK_SMOKE": "1",
         "BAYESNCL_PROJECT_DIR": str(project),
         "BAYESNCL_ZIP": str(repo_zip(tmp_path / "bayesncl_jax.zip")),
         "BAYESNCL_WORKDIR": str(workdir),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
         "JAX_PLATFORMS": "cpu"}
  for key, value in env.items():  # the kernel inherits this environment
    monkeypatch.setenv(key, value)
  monkeypatch.delenv("PYTHONPATH", raising=False)  # the unpacked copy runs
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(
      "import sys\nprint('kernel imported:', sorted(m for m in ('jax', "
      "'tensorflow_datasets', 'grain', 'orbax') if m in sys.modules))"))
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}
                          ).execute()
  out = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type ==
                "code" for o in cell.outputs if o.output_type == "stream")
  assert f"unpacked {tmp_path / 'bayesncl_jax.zip'}" in out
  assert f"-m pip install -q -r {project}/requirements.txt jax[cuda12]==" in (
      out)
  assert "smoke mode" in out
  assert "kernel imported: []" in out
  report = json.loads((workdir / "eval" / "report.json").read_text())
  assert 0.0 <= report["linear_top1"] <= 1.0
  assert list((workdir / "eval").glob("*.png"))
  # The pictures cell displayed them in the notebook.
  assert any(o.output_type == "display_data" and "image/png" in o.get(
      "data", {}) for cell in nb.cells if cell.cell_type == "code"
             for o in cell.outputs)
