"""requirements*.txt and pyproject.toml agree, and every runtime pin is used.

requirements.txt pins the versions CI runs; pyproject.toml (what `pip
install .` resolves) must allow exactly those, bounded above by the next
release that may break the API, so that `pip install .` alone cannot pull
an untested major release. A runtime pin nobody imports is either named
here with the reason it is needed, or moved to requirements-dev.txt.
"""
import ast
import importlib.metadata
import pathlib
import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Runtime pins the package does not import itself, and why they are needed.
INDIRECT = {
    "jaxlib": "jax's compiled backend",
    "fsspec": "the file-system layer under etils.epath for gs://",
}


def pins(name: str) -> dict[str, Version]:
  out = {}
  for line in (ROOT / name).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if not line or line.startswith("-r"):
      continue
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
    assert m, f"{name}: {line!r} is not NAME==VERSION"
    out[canonicalize_name(m.group(1))] = Version(m.group(2))
  return out


def pyproject():
  return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _check_bounds(requirements, pinned, where):
  for req in requirements:
    name = canonicalize_name(req.name)
    pin = pinned[name]
    ops = {s.operator: Version(s.version) for s in req.specifier}
    assert set(ops) == {">=", "<"}, f"{where}: {req} needs >=PIN,<NEXT"
    assert ops[">="] == pin, f"{where}: {req} vs the pin {name}=={pin}"
    assert pin < ops["<"], f"{where}: {req} excludes the pin {pin}"
    # The upper bound is the next breaking release: next minor for 0.x,
    # next major (or next year for calendar versions) otherwise.
    if pin.major == 0:
      want = Version(f"0.{pin.minor + 1}")
    else:
      want = Version(f"{pin.major + 1}")
    assert ops["<"] == want, f"{where}: {req}: upper bound {want} expected"


def test_pyproject_bounds_match_requirements_txt():
  runtime = pins("requirements.txt")
  deps = [Requirement(d) for d in pyproject()["dependencies"]]
  assert sorted(canonicalize_name(r.name) for r in deps) == sorted(runtime)
  _check_bounds(deps, runtime, "dependencies")
  dev = {**runtime, **pins("requirements-dev.txt")}
  extras = pyproject()["optional-dependencies"]
  test = [Requirement(d) for d in extras["test"]]
  assert sorted(canonicalize_name(r.name) for r in test) == sorted(
      set(pins("requirements-dev.txt")) - {"torch"})
  _check_bounds(test, dev, "test extra")
  _check_bounds([Requirement(d) for d in extras["torch"]], dev, "torch")


def _imported_top_level_modules() -> set[str]:
  names = set()
  for path in (ROOT / "bayesncl_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names |= {a.name.split(".")[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and not (
          node.level):
        names.add(node.module.split(".")[0])
  return names


def test_every_runtime_pin_is_used_and_test_tools_are_not_runtime():
  dists = importlib.metadata.packages_distributions()
  used = {canonicalize_name(d) for module in _imported_top_level_modules()
          for d in dists.get(module, ())}
  runtime = pins("requirements.txt")
  unused = sorted(set(runtime) - used - set(INDIRECT))
  assert not unused, (f"pinned in requirements.txt, never imported: {unused}"
                      " (move it to requirements-dev.txt, or say in INDIRECT"
                      " why it is needed)")
  assert not set(INDIRECT) & used, "INDIRECT lists an imported package"
  # Imported by the package => a runtime pin (stdlib and the package itself
  # have no distribution; torch is the optional extra of `convert`).
  missing = sorted(used - set(runtime) - {"bayesncl-jax", "torch"})
  assert not missing, f"imported but not pinned in requirements.txt: {missing}"
  for test_only in ("chex", "importlib-resources", "pytest"):
    assert test_only not in runtime
