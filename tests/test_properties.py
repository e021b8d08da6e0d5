"""Property-based tests (hypothesis) of the config argument parser and the
record readers: no input makes them crash, drop a good record or invent
one."""
from __future__ import annotations

import json
import pathlib
import tempfile

from hypothesis import given, settings, strategies as st
import pytest

from bayesncl_jax import atomic
from bayesncl_jax import config_lib
from bayesncl_jax import integrity
from bayesncl_jax import run_record

DEFAULTS = dict(config_lib.VARIANT_ARGS, lr=0.1)
_WORD = st.text(st.characters(blacklist_characters=",=\x00",
                              blacklist_categories=("Cs",)), min_size=1,
                max_size=12)


@given(st.text(max_size=60))
@settings(max_examples=300, deadline=None)
def test_parse_arg_accepts_or_explains_any_text(arg):
  try:
    out = config_lib.parse_arg(arg, **DEFAULTS)
  except config_lib.ConfigError as e:
    assert str(e)  # a message, never another exception
    return
  assert set(out) == set(DEFAULTS)
  for key, value in out.items():
    assert type(value) is type(DEFAULTS[key])


@given(method=_WORD, top_k=st.integers(-10**6, 10**6), soft=st.booleans(),
       lr=st.floats(allow_nan=False, allow_infinity=False),
       bare=st.booleans())
@settings(max_examples=200, deadline=None)
def test_parse_arg_round_trips(method, top_k, soft, lr, bare):
  items = [f"method={method}", f"top_k={top_k}", f"lr={lr!r}"]
  if soft:
    items.append("soft_gate" if bare else "soft_gate=true")
  out = config_lib.parse_arg(",".join(items), **DEFAULTS)
  assert out.method == method and out.top_k == top_k and out.lr == lr
  assert out.soft_gate is soft and out.no_isolation is False
  assert out.gate == DEFAULTS["gate"]


def _row(step):
  return json.dumps({"step": step, "loss": step / 7})


_LINE = st.one_of(
    st.integers(0, 50).map(_row).map(lambda s: ("good", s)),
    st.text(st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e"
                          "\x85\u2028\u2029", blacklist_categories=("Cs",)),
            min_size=1, max_size=30).map(lambda s: ("raw", s)))


def _is_record(line: str) -> bool:
  try:
    return isinstance(json.loads(line), dict)
  except ValueError:
    return False


@given(st.lists(_LINE, max_size=25), st.integers(0, 50))
@settings(max_examples=150, deadline=None)
def test_truncate_metrics_never_drops_a_good_row(lines, step):
  with tempfile.TemporaryDirectory() as folder:
    path = pathlib.Path(folder) / "metrics.jsonl"
    text = [s for _, s in lines]
    path.write_text("".join(s + "\n" for s in text))
    dropped = run_record.truncate_metrics(path, step)
    good = [s for s in text if s.strip() and _is_record(s)]
    bad = [s for s in text if s.strip() and not _is_record(s)]
    want = [s for s in good
            if not isinstance(json.loads(s).get("step", 0), (int, float))
            or json.loads(s).get("step", 0) <= step]
    assert path.read_text().splitlines() == want
    assert dropped == len(good) - len(want)
    kept = sorted(pathlib.Path(folder).glob("metrics.jsonl.corrupt-*"))
    assert ("".join(k.read_text() for k in kept).splitlines() == bad)
    assert not list(pathlib.Path(folder).glob("*.tmp"))


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(
    max_size=5), lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.text(max_size=6), c, max_size=3), max_leaves=8))
@settings(max_examples=200, deadline=None)
def test_any_json_manifest_is_read_or_called_corrupt(value):
  with tempfile.TemporaryDirectory() as folder:
    ckpt = pathlib.Path(folder)
    (ckpt / "3").mkdir()
    (ckpt / "3" / "a").write_bytes(b"x")
    atomic.write_text(integrity.manifest_path(ckpt, 3), json.dumps(value))
    status, detail = integrity.verify(ckpt, 3)  # never raises
    assert status in ("intact", "unsealed", "corrupt") and detail
    integrity.prior_train_seconds(ckpt, 3)


def test_atomic_write_leaves_no_temporary_file_on_failure(tmp_path,
                                                          monkeypatch):
  target = tmp_path / "record.json"
  target.write_text("old")
  def fail(*a):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(atomic.os, "replace", fail)
  with pytest.raises(OSError):
    atomic.write_text(target, "new")
  assert target.read_text() == "old"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]
