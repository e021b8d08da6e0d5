"""The one persistent compilation cache of every command (cli.py)."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.experimental.compilation_cache import compilation_cache
import pytest

from bayesncl_jax import cli
from bayesncl_jax import reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENVS = (cli.COMPILATION_CACHE_ENV, "JAX_COMPILATION_CACHE_DIR",
        "BAYESNCL_CACHE_DIR", "XDG_CACHE_HOME")


@pytest.fixture
def clean_env(monkeypatch):
  for name in ENVS:
    monkeypatch.delenv(name, raising=False)
  return monkeypatch


@pytest.fixture
def restore_jax_cache():
  names = ("jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs")
  old = {n: getattr(jax.config, n) for n in names}
  yield
  compilation_cache.reset_cache()
  for name, value in old.items():
    jax.config.update(name, value)


def test_default_is_beside_the_user_data_cache(clean_env, tmp_path):
  home = tmp_path / "home"
  clean_env.setenv("HOME", str(home))
  assert cli.compilation_cache_dir() == str(
      home / ".cache/bayesncl_jax/jax_compilation_cache")
  clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert cli.compilation_cache_dir() == str(
      tmp_path / "xdg/bayesncl_jax/jax_compilation_cache")
  clean_env.setenv("BAYESNCL_CACHE_DIR", str(tmp_path / "data_cache"))
  assert cli.compilation_cache_dir() == str(
      tmp_path / "data_cache/jax_compilation_cache")


def test_precedence_flag_then_ours_then_jax_env(clean_env, tmp_path):
  clean_env.setenv("BAYESNCL_CACHE_DIR", str(tmp_path / "default"))
  clean_env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
  assert cli.compilation_cache_dir() == str(tmp_path / "jax")
  clean_env.setenv(cli.COMPILATION_CACHE_ENV, str(tmp_path / "ours"))
  assert cli.compilation_cache_dir() == str(tmp_path / "ours")
  assert cli.compilation_cache_dir(str(tmp_path / "flag")) == str(
      tmp_path / "flag")
  # Off: '' / none / off, from the flag or the variable.
  for off in ("", "none", "OFF"):
    assert cli.compilation_cache_dir(off) is None
  clean_env.setenv(cli.COMPILATION_CACHE_ENV, "")
  assert cli.compilation_cache_dir() is None


def test_paths_are_absolute_and_buckets_kept(clean_env, tmp_path):
  clean_env.chdir(tmp_path)
  assert cli.compilation_cache_dir("rel/cache") == str(tmp_path / "rel/cache")
  assert cli.compilation_cache_dir("gs://bucket/jax_cache") == "gs://bucket/jax_cache"


def test_warm_process_loads_from_the_cache(tmp_path, restore_jax_cache):
  folder = str(tmp_path / "cache")
  assert cli.enable_compilation_cache(folder) == folder
  assert jax.config.jax_compilation_cache_dir == folder
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  hits = []
  jax.monitoring.register_event_listener(
      lambda event, **kw: hits.append(event)
      if event == "/jax/compilation_cache/cache_hits" else None)

  def f(x):
    return jnp.sin(x) * 3.0 + 0.123456

  x = jnp.arange(7.0)
  want = jax.jit(f)(x)
  assert os.listdir(folder)  # written
  jax.clear_caches()  # forget the in-memory executable: a "new process".
  got = jax.jit(f)(x)
  assert hits, "the second compile was not served from the disk cache"
  assert jnp.array_equal(got, want)


def test_off_leaves_jax_uncached(restore_jax_cache):
  assert cli.enable_compilation_cache("") is None
  assert jax.config.jax_compilation_cache_dir is None


_ENTRY = textwrap.dedent("""
    import jax
    from bayesncl_jax import cli

    def main(argv):
      print("cache:", jax.config.jax_compilation_cache_dir)
      # Two programs compile: the run goes on, uncached.
      print("sum:", int(jax.jit(lambda x: x + 1)(41)),
            int(jax.jit(lambda x: x * 2)(21)))

    cli.run(main)
    """)


def _entry(tmp_path, *args, env=None):
  script = tmp_path / "entry.py"
  script.write_text(_ENTRY)
  full_env = {k: v for k, v in os.environ.items() if k not in ENVS}
  full_env.update({"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                   **(env or {})})
  return subprocess.run([sys.executable, str(script), *args], env=full_env,
                        capture_output=True, text=True, timeout=120,
                        cwd=tmp_path)


@pytest.mark.slow
def test_every_entry_point_takes_the_flag(tmp_path):
  proc = _entry(tmp_path, f"--compilation_cache={tmp_path / 'c'}",
                env={cli.COMPILATION_CACHE_ENV: str(tmp_path / "env")})
  assert proc.returncode == 0, proc.stderr
  assert f"cache: {tmp_path / 'c'}" in proc.stdout
  assert os.listdir(tmp_path / "c") and not (tmp_path / "env").exists()


def test_unwritable_folder_is_one_warning_and_the_run_goes_on(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  bad = blocker / "cache"  # below a regular file: not creatable, even as root
  proc = _entry(tmp_path, env={cli.COMPILATION_CACHE_ENV: str(bad)})
  assert proc.returncode == 0, proc.stderr
  assert "cache: None" in proc.stdout and "sum: 42 42" in proc.stdout
  warnings = [line for line in proc.stderr.splitlines()
              if str(bad) in line]
  assert len(warnings) == 1, proc.stderr
  assert "cannot be written" in warnings[0]
  assert "--compilation_cache" in warnings[0]


def test_reproduce_passes_the_one_setting_to_its_runs(clean_env, tmp_path):
  clean_env.setenv("BAYESNCL_CACHE_DIR", str(tmp_path))
  env = reproduce.subprocess_env(None)
  assert env[cli.COMPILATION_CACHE_ENV] == str(
      tmp_path / "jax_compilation_cache")
  assert reproduce.subprocess_env(str(tmp_path / "x"))[
      cli.COMPILATION_CACHE_ENV] == str(tmp_path / "x")
  assert reproduce.subprocess_env("")[cli.COMPILATION_CACHE_ENV] == ""
