"""Tests of the launch/ scripts: printed commands, argument checks, shellcheck.

Every script runs with --dry-run (nothing executed) and the printed `+ CMD`
lines are parsed back with shlex. The remote command lines that gcloud would
send to the TPU workers are also *executed* here with POSIX sh (dash) against
fake gcloud / tmux / git / python programs in a temporary HOME, which checks
the nested quoting end to end: an override with spaces, commas and quotes must
reach bayesncl_jax.main as one unchanged argv element. No real gcloud, sudo,
pkill or TPU is touched.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import types
import uuid
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh"))
ENTRY_POINTS = [s for s in SCRIPTS if s != "common.sh"]

TPU = ["--name=pod", "--zone=us-central2-b"]
TRAIN = TPU + ["--config=configs/cifar10.py:method=ncl",
               "--workdir=gs://bucket/runs/ncl"]
TRICKY = ["--config.aug.crop_scale=(0.2, 1.0)",
          "--config.name=it's a $HOME `x` \\ run!",
          "--config.dataset.data_dir=gs://bucket/tfds"]

# Minimal valid arguments of each entry point.
VALID = {
    "tpu_create.sh": TPU + ["--accelerator_type=v4-64",
                            "--version=tpu-ubuntu2204-base"],
    "tpu_setup.sh": TPU + ["--repo=https://github.com/org/bayesncl_jax.git"],
    "tpu_train.sh": TRAIN,
    "tpu_kill.sh": TPU,
    "tpu_delete.sh": TPU,
    "tpu_recover.sh": TPU + ["--accelerator_type=v4-32",
                             "--version=tpu-ubuntu2204-base",
                             "--repo=https://github.com/org/bayesncl_jax.git",
                             "--config=configs/cifar10.py:method=ncl",
                             "--workdir=gs://bucket/runs/ncl"],
    "gpu_train.sh": ["--config=configs/cifar10.py", "--workdir=/tmp/w"],
    "gpu_setup.sh": ["--venv=/tmp/bayesncl_test_venv"],
}
REQUIRED = {
    "tpu_create.sh": ["name", "zone", "accelerator_type", "version"],
    "tpu_setup.sh": ["name", "zone", "repo"],
    "tpu_train.sh": ["name", "zone", "config", "workdir"],
    "tpu_kill.sh": ["name", "zone"],
    "tpu_delete.sh": ["name", "zone"],
    "tpu_recover.sh": ["name", "zone", "accelerator_type", "version", "repo",
                       "config", "workdir"],
    "gpu_train.sh": ["config", "workdir"],
    "gpu_setup.sh": [],
}
# Scripts that run more than one command (not a single gcloud call).
MULTI = ("tpu_recover.sh", "gpu_setup.sh", "gpu_train.sh")


# tpu_train.sh forwards these to the workers when set; the test session sets
# XLA_FLAGS for itself (conftest), which is not what the scripts are given.
FORWARDED_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS")


def clean_env(env=None):
  env = dict(os.environ if env is None else env)
  for name in FORWARDED_ENV:
    env.pop(name, None)
  return env


def sh(script, *args, env=None, check=None):
  """Runs launch/SCRIPT with ARGS; returns the CompletedProcess."""
  proc = subprocess.run(["bash", str(LAUNCH / script), *args],
                        capture_output=True, text=True, timeout=60,
                        env=clean_env() if env is None else env)
  if check is not None:
    assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
  return proc


def dry(script, *args):
  """The commands SCRIPT prints under --dry-run, each as an argv list."""
  proc = sh(script, *args, "--dry-run", check=0)
  lines = proc.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), proc.stdout
  return [shlex.split(line[2:]) for line in lines]


def fails(script, *args):
  """SCRIPT's error message; asserts it exits non-zero without output."""
  proc = sh(script, *args, "--dry-run")
  assert proc.returncode != 0, proc.stdout
  assert proc.stdout == ""
  assert proc.stderr.startswith(f"{script}: error: "), proc.stderr
  return proc.stderr


def remote_command(argv):
  """The --command= of a `gcloud compute tpus tpu-vm ssh` argv."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  [command] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def only_ssh(script, *args):
  [argv] = dry(script, *args)
  assert argv[5] == "pod"
  assert "--worker=all" in argv and "--zone=us-central2-b" in argv
  return argv


# ---------------------------------------------------------------- fakes ----

def write_exe(path: Path, text: str) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)
  path.chmod(0o755)
  return path


ENV_SEEN = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "NCCL_DEBUG",
            "CUDA_VISIBLE_DEVICES", "NCCL_SOCKET_IFNAME")
# Appends one call to $FAKE_CALLS: prog, cwd, ENV_SEEN ("=value" when set),
# argv; fields end with \037, calls with \036. Shell, not Python: fast.
RECORDER = "#!/bin/sh\n{ printf '%s\\037' \"$FAKE_PROG\" \"$(pwd)\" " + " ".join(
    f'"${{{v}+=${v}}}"' for v in ENV_SEEN) + """ "$@"; printf '\\036'; } >>"$FAKE_CALLS"
"""


SANDBOX_TOOLS = ("bash", "sh", "dirname", "basename", "tr", "mkdir", "cat",
                 "chmod", "rm", "sleep", "nohup", "env", "sed", "head", "ls",
                 "touch", "grep", "pkill", "pgrep", "printf")


@pytest.fixture
def fake(tmp_path):
  """A sandbox: fake bin/ first on PATH, HOME in tmp, calls recorded."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  home.mkdir()
  calls = tmp_path / "calls.log"
  recorder = write_exe(tmp_path / "recorder", RECORDER)

  def record(prog, then=""):
    """Source of a program PROG that records its call, then runs THEN."""
    return f'#!/bin/sh\nFAKE_PROG={prog} "{recorder}" "$@" >/dev/null\n{then}'

  # sudo runs nothing; `sudo pgrep` finds no job.
  write_exe(bin_dir / "sudo", record("sudo", '[ "$1" != pgrep ] || exit 1\n'))
  write_exe(bin_dir / "pgrep", record("pgrep", "exit 1\n"))  # no job left.
  # gcloud: records, then runs an ssh --command with sh, like one worker.
  write_exe(bin_dir / "gcloud", record("gcloud", """
for a in "$@"; do
  case $a in --command=*) exec sh -c "${a#--command=}" ;; esac
done
"""))
  # tmux new-session -d -s NAME CMD: runs CMD with sh, in the foreground.
  write_exe(bin_dir / "tmux", record("tmux", 'eval "exec sh -c \\"\\${$#}\\""\n'))
  write_exe(bin_dir / "hostname", "#!/bin/sh\necho t1v-n-test-w-0\n")
  # Only the fakes and these tools on PATH: no real python3.1x, gcloud, ...
  tools = tmp_path / "tools"
  tools.mkdir()
  for tool in SANDBOX_TOOLS:
    if shutil.which(tool):
      (tools / tool).symlink_to(shutil.which(tool))
  env = dict(clean_env(), HOME=str(home), FAKE_CALLS=str(calls),
             PATH=f"{bin_dir}:{tools}")

  f = types.SimpleNamespace()
  f.bin, f.home, f.env, f.tmp, f.record = bin_dir, home, env, tmp_path, record

  def read_calls(prog=None):
    if not calls.exists():
      return []
    recs = []
    for call in calls.read_text().split("\036")[:-1]:
      name, cwd, *fields = call.split("\037")[:-1]
      env_values, argv = fields[:len(ENV_SEEN)], fields[len(ENV_SEEN):]
      recs.append({"prog": name, "cwd": cwd, "argv": argv, "env": {
          k: v[1:] if v else None for k, v in zip(ENV_SEEN, env_values)}})
    return [r for r in recs if prog is None or r["prog"] == prog]

  f.calls = read_calls
  return f


# ---------------------------------------------------------------- common ----

SHQ_VALUES = [
    "plain", "", "a b", "a,b=c", "(0.2, 1.0)", "it's", "$HOME", "`x`",
    "back\\slash", "wow!", 'say "hi"', "~/x", "*", "--k='v w'", "X=a b",
    "multi\nline", "tab\tsep", "--config.a=[1, 2]", "--c.d=\"$x\" 'y'"]


def test_shq_round_trips_through_bash_and_posix_sh():
  quoted = subprocess.run(
      ["bash", "-c", f'source "{LAUNCH}/common.sh"; shq "$@"', "shq",
       *SHQ_VALUES], capture_output=True, text=True, check=True).stdout
  assert shlex.split(quoted) == SHQ_VALUES
  assert "--config.a=\"[1, 2]\"" in quoted  # --flag="value", nests well
  for shell in ("sh", "bash"):
    out = subprocess.run([shell, "-c", "printf '%s\\0' " + quoted],
                         capture_output=True, text=True, check=True).stdout
    assert out.split("\0")[:-1] == SHQ_VALUES, shell


# ------------------------------------------------------- argument checks ----

@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_prints_usage(script):
  proc = sh(script, "--help", check=0)
  assert proc.stdout.startswith("Usage: ") and "--dry-run" in proc.stdout
  assert sh(script, "-h", check=0).stdout == proc.stdout


@pytest.mark.parametrize("script", [s for s in ENTRY_POINTS if REQUIRED[s]])
def test_missing_required_flags_are_named(script):
  for flag in REQUIRED[script]:
    args = [a for a in VALID[script] if not a.startswith(f"--{flag}=")]
    assert f"--{flag}" in fails(script, *args)
  message = fails(script)
  assert "missing required flag(s)" in message
  for flag in REQUIRED[script]:
    if flag != "config":  # tpu/gpu_train check --config after the others.
      assert f"--{flag}" in message


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_unknown_flags_and_bad_syntax_fail(script):
  good = VALID[script]
  assert "unknown flag: --bogus" in fails(script, *good, "--bogus=1")
  assert "unknown flag: --frob" in fails(script, *good, "--frob")
  assert "unexpected argument: 'stray'" in fails(script, *good, "stray")
  # --flag value (space) instead of --flag=value.
  flag = {"gpu_train.sh": "workdir", "gpu_setup.sh": "venv"}.get(script,
                                                                 "zone")
  assert f"--{flag} needs a value" in fails(script, *good, f"--{flag}",
                                            "somewhere")
  assert "--dry_run is a switch" in fails(script, *good, "--dry-run=yes")
  if script not in ("tpu_train.sh", "gpu_train.sh", "tpu_recover.sh"):
    assert "unknown flag: --config.x" in fails(script, *good, "--config.x=1")


def test_hyphenated_flag_names_are_accepted():
  assert dry("tpu_create.sh", *TPU, "--accelerator-type=v4-8",
             "--version=v") == dry("tpu_create.sh", *TPU,
                                   "--accelerator_type=v4-8", "--version=v")


# ------------------------------------------------------------ tpu_create ----

def test_tpu_create_single_host_and_pod():
  for acc in ("v4-8", "v4-64", "v5litepod-16", "v5p-32", "v6e-8"):
    [argv] = dry("tpu_create.sh", *TPU, f"--accelerator_type={acc}",
                 "--version=tpu-ubuntu2204-base")
    assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod",
                    "--zone=us-central2-b", f"--accelerator-type={acc}",
                    "--version=tpu-ubuntu2204-base"]


@pytest.mark.parametrize("kind", ["spot", "preemptible"])
def test_tpu_create_spot_preemptible_project(kind):
  [argv] = dry("tpu_create.sh", *VALID["tpu_create.sh"], f"--{kind}",
               "--project=my-proj")
  assert argv[4:6] == ["create", "pod"]
  assert argv[-1] == f"--{kind}" and "--project=my-proj" in argv


QUEUED = ["gcloud", "compute", "tpus", "queued-resources", "create", "pod",
          "--node-id=pod", "--zone=us-central2-b",
          "--accelerator-type=v5litepod-16",
          "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
DESCRIBE_QUEUED = ["gcloud", "compute", "tpus", "queued-resources",
                   "describe", "pod", "--zone=us-central2-b",
                   "--format=value(state.state)"]


def test_tpu_create_queued():
  args = [*TPU, "--accelerator_type=v5litepod-16",
          "--version=v2-alpha-tpuv5-lite", "--queued", "--spot"]
  # The request, then the state query it polls until ACTIVE.
  assert dry("tpu_create.sh", *args) == [QUEUED, DESCRIBE_QUEUED]
  assert dry("tpu_create.sh", *args, "--no_wait") == [QUEUED]


def _fake_queued_gcloud(fake, states):
  """gcloud that answers `queued-resources describe` with STATES in turn."""
  (fake.tmp / "states").write_text("\n".join(states) + "\n")
  write_exe(fake.bin / "gcloud", fake.record("gcloud", f"""
case "$*" in *"queued-resources describe"*)
  head -n 1 "{fake.tmp}/states"; sed -i 1d "{fake.tmp}/states" ;;
esac
"""))


@pytest.mark.parametrize("states, code, said", [
    (["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], 0, "is ACTIVE"),
    (["PROVISIONING", "FAILED"], 2, "is FAILED"),
    (["WAITING_FOR_RESOURCES"] * 9, 2, "still WAITING_FOR_RESOURCES after")])
def test_tpu_create_queued_waits_for_active(fake, states, code, said):
  _fake_queued_gcloud(fake, states)
  proc = sh("tpu_create.sh", *TPU, "--accelerator_type=v4-32", "--version=v",
            "--queued", "--poll_seconds=1", "--wait_timeout=2", env=fake.env)
  assert proc.returncode == code, proc.stderr
  assert said in proc.stderr
  calls = [c["argv"][:4] for c in fake.calls("gcloud")]
  assert calls[0] == ["compute", "tpus", "queued-resources", "create"]
  assert all(c == ["compute", "tpus", "queued-resources", "describe"]
             for c in calls[1:])
  if code == 0:
    assert len(calls) == 1 + len(states)


def test_tpu_create_rejects_bad_combinations():
  good = VALID["tpu_create.sh"]
  assert "exclusive" in fails("tpu_create.sh", *good, "--spot", "--preemptible")
  assert "use --spot" in fails("tpu_create.sh", *good, "--queued",
                               "--preemptible")
  assert "--accelerator_type=v4" in fails(
      "tpu_create.sh", *TPU, "--accelerator_type=v4", "--version=x")


# ------------------------------------------------------------ tpu_delete ----

def test_tpu_delete():
  [argv] = dry("tpu_delete.sh", *TPU)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod",
                  "--zone=us-central2-b"]
  [argv] = dry("tpu_delete.sh", *TPU, "--queued", "--yes", "--project=p")
  assert argv == ["gcloud", "compute", "tpus", "queued-resources", "delete",
                  "pod", "--zone=us-central2-b", "--project=p", "--force",
                  "--quiet"]


# ------------------------------------------------------------- tpu_setup ----

def test_tpu_setup_command():
  argv = only_ssh("tpu_setup.sh", *TPU, "--repo=git@github.com:o/r.git",
                  "--branch=dev")
  cmd = remote_command(argv)
  assert "git clone -q --branch dev git@github.com:o/r.git" in cmd
  assert "merge -q --ff-only FETCH_HEAD" in cmd
  assert "$PY -m venv" in cmd and "for c in python3.13 python3.12 python3.11 python3;" in cmd
  assert "pip install -q -r \"$HOME\"/bayesncl_jax/requirements.txt" in cmd
  assert "pip install -q --no-deps -e \"$HOME\"/bayesncl_jax" in cmd
  # The TPU jax pin is installed last, after the generic requirements.
  jax_tpu = cmd.index('pip install -q -U "jax[tpu]==0.10.2";')
  assert jax_tpu > cmd.index("requirements.txt") > cmd.index("git clone")
  cmd = remote_command(only_ssh("tpu_setup.sh", *VALID["tpu_setup.sh"],
                                "--jax_version="))
  assert 'pip install -q -U "jax[tpu]";' in cmd


def test_tpu_setup_validates_python_and_version():
  good = VALID["tpu_setup.sh"]
  assert "--python=/usr/bin/python3" in fails("tpu_setup.sh", *good,
                                              "--python=/usr/bin/python3")
  assert "--jax_version=x y" in fails("tpu_setup.sh", *good,
                                      "--jax_version=x y")


def fake_python(fake, path, version, name="python", venv_python=None):
  """A fake interpreter reporting Python `version` (a (3, N) tuple); `-m
  venv DIR` makes DIR/bin/python, a fake "python" of the same version."""
  major, minor = version
  if venv_python is None and name != "python":
    venv_python = fake.tmp / f"venv_python_{major}{minor}"
    fake_python(fake, venv_python, version)
  source = f'"{venv_python}"' if venv_python else '"$0"'
  write_exe(path, fake.record(name) + f"""
case "$1 $2" in
  *"sys.version_info < (3, 11)"*) exit {0 if version >= (3, 11) else 1} ;;
  *"sys.version_info[:2]"*) echo "({major}, {minor})" ;;
  "-c import ensurepip") exit ${{FAKE_ENSUREPIP:-0}} ;;
  "-m venv") mkdir -p "$3/bin" && cp {source} "$3/bin/python" ;;
  "-c import sys, jax"*) echo "fake python ran" ;;
esac
""")


def _setup_fakes(fake, have_ensurepip=True, python3=(3, 11)):
  """System python3 and git for the setup script, recording their calls."""
  fake_python(fake, fake.bin / "python3", python3, name="python3")
  fake.env["FAKE_ENSUREPIP"] = "0" if have_ensurepip else "1"
  write_exe(fake.bin / "git", fake.record("git", """
if [ "$1" = clone ]; then eval "dir=\\${$#}"; mkdir -p "$dir/.git"; fi
"""))
  for tool in ("cp", "cut"):
    if not (fake.bin / tool).exists():
      (fake.bin / tool).symlink_to(shutil.which(tool))


def _progs(calls):
  return [(c["prog"], c["argv"][:2]) for c in calls]


def _pips(fake):
  return [c["argv"] for c in fake.calls("python") if c["argv"][:2] ==
          ["-m", "pip"]]


def test_tpu_setup_runs_on_a_worker_and_is_idempotent(fake):
  _setup_fakes(fake)
  args = [*VALID["tpu_setup.sh"], "--branch=dev"]
  first = sh("tpu_setup.sh", *args, env=fake.env, check=0)
  assert "fake python ran" in first.stdout  # the import check at the end
  calls = fake.calls()
  assert _progs(calls)[0] == ("gcloud", ["compute", "tpus"])
  assert ("python3", ["-m", "venv"]) in _progs(calls)
  assert ("git", ["clone", "-q"]) in _progs(calls)
  assert not fake.calls("sudo")  # python >= 3.11, git, tmux, ensurepip there
  home = str(fake.home)
  assert _pips(fake) == [
      ["-m", "pip", "install", "-q", "-U", "pip"],
      ["-m", "pip", "install", "-q", "-r", f"{home}/bayesncl_jax/requirements.txt"],
      ["-m", "pip", "install", "-q", "--no-deps", "-e", f"{home}/bayesncl_jax"],
      ["-m", "pip", "install", "-q", "-U", "jax[tpu]==0.10.2"]]
  assert (fake.home / "bayesncl_venv/bin/python").exists()

  (fake.tmp / "calls.log").unlink()
  second = sh("tpu_setup.sh", *args, env=fake.env, check=0)
  progs = _progs(fake.calls())
  assert ("python3", ["-m", "venv"]) not in progs  # venv kept
  assert "rebuilding" not in second.stdout
  assert ("git", ["clone", "-q"]) not in progs     # checkout updated instead
  git = [c["argv"] for c in fake.calls("git")]
  assert git == [["-C", f"{home}/bayesncl_jax", "fetch", "-q", "origin", "dev"],
                 ["-C", f"{home}/bayesncl_jax", "checkout", "-q", "dev"],
                 ["-C", f"{home}/bayesncl_jax", "merge", "-q", "--ff-only",
                  "FETCH_HEAD"]]


def test_tpu_setup_installs_missing_system_packages(fake):
  _setup_fakes(fake, have_ensurepip=False)
  sh("tpu_setup.sh", *VALID["tpu_setup.sh"], env=fake.env, check=0)
  sudo = [c["argv"] for c in fake.calls("sudo")]
  assert sudo[1][-5:] == ["-y", "-qq", "git", "tmux", "python3-venv"]


def _apt_sudo(fake):
  """sudo that 'installs' python3.11 (a fake reporting 3.11) with apt-get;
  with FAKE_NO_UNIVERSE=1 only after the deadsnakes PPA was added."""
  fake_python(fake, fake.tmp / "python3.11", (3, 11), name="python3.11")
  write_exe(fake.bin / "sudo", fake.record("sudo", f"""
case "$*" in
  *add-apt-repository*) touch "{fake.tmp}/ppa" ;;
  *"install -y -qq python3.11 python3.11-venv"*)
    if [ "${{FAKE_NO_UNIVERSE:-0}}" = 1 ] && [ ! -e "{fake.tmp}/ppa" ]; then
      exit 100
    fi
    cp "{fake.tmp}/python3.11" "{fake.bin}/python3.11" ;;
esac
"""))


@pytest.mark.parametrize("universe", [True, False])
def test_tpu_setup_gets_python311_on_a_310_image_and_rebuilds_the_venv(
    fake, universe):
  """The TPU images' python3 is 3.10: setup installs python3.11 and
  replaces the venv an older setup made with 3.10."""
  _setup_fakes(fake, python3=(3, 10))
  _apt_sudo(fake)
  stale = fake.home / "bayesncl_venv" / "bin" / "python"
  stale.parent.mkdir(parents=True)
  stale.write_bytes((fake.tmp / "venv_python_310").read_bytes())
  stale.chmod(0o755)
  env = {**fake.env, "FAKE_NO_UNIVERSE": "0" if universe else "1"}
  proc = sh("tpu_setup.sh", *VALID["tpu_setup.sh"], env=env, check=0)
  assert "t1v-n-test-w-0: rebuilding the venv with python3.11" in proc.stdout
  sudo = [" ".join(c["argv"]) for c in fake.calls("sudo")]
  installs = [c for c in sudo if "install -y -qq python3.11" in c]
  assert len(installs) == (1 if universe else 2)
  assert any("ppa:deadsnakes/ppa" in c for c in sudo) == (not universe)
  assert ("python3.11", ["-m", "venv"]) in _progs(fake.calls())
  assert ("python3", ["-m", "venv"]) not in _progs(fake.calls())
  # The new venv is the 3.11 one, and it got the packages.
  version = subprocess.run([str(stale), "-c", "import sys; print("
                            "sys.version_info[:2])"], env=env,
                           capture_output=True, text=True).stdout
  assert version.strip() == "(3, 11)"
  assert _pips(fake)[-1] == ["-m", "pip", "install", "-q", "-U",
                             "jax[tpu]==0.10.2"]
  assert "fake python ran" in proc.stdout


def test_tpu_setup_refuses_an_old_explicit_python(fake):
  _setup_fakes(fake, python3=(3, 10))
  proc = sh("tpu_setup.sh", *VALID["tpu_setup.sh"], "--python=python3",
            env=fake.env)
  assert proc.returncode == 1
  assert ("t1v-n-test-w-0: error: python3 is missing or older than Python "
          "3.11") in proc.stderr
  assert not fake.calls("git")  # stopped before touching anything


# ------------------------------------------------------------- tpu_train ----

def _job(cmd):
  """The job string handed to tmux inside a tpu_train remote command."""
  words = shlex.split(cmd)
  i = words.index("new-session")
  assert words[i - 1] == "tmux" and words[i + 1:i + 4] == ["-d", "-s", "bayesncl"]
  return words[i + 4]


def test_tpu_train_command_passes_config_workdir_overrides():
  argv = only_ssh("tpu_train.sh", *TRAIN, *TRICKY)
  cmd = remote_command(argv)
  assert cmd.startswith('mkdir -p "$HOME"/bayesncl_logs && tmux new-session')
  job = _job(cmd)
  # The log copier (gs:// workdir) starts first, then the job itself.
  assert job.startswith("(while sleep 60; do gcloud storage cp ")
  assert ' & cd "$HOME"/bayesncl_jax && {' in job
  steps = job[job.index("{ ") + 2:job.index("; }")]
  assert shlex.split(steps) == [
      "$HOME/bayesncl_venv/bin/python", "-u", "-m", "bayesncl_jax.main",
      "--config=configs/cifar10.py:method=ncl",
      "--workdir=gs://bucket/runs/ncl", *TRICKY]
  assert '>>"$HOME"/bayesncl_logs/bayesncl-"$(hostname)".log 2>&1' in job
  assert "bayesncl_jax.evaluate" not in job


def test_tpu_train_eval_and_eval_only():
  job = _job(remote_command(only_ssh("tpu_train.sh", *TRAIN, "--eval")))
  assert ("bayesncl_jax.main --config=configs/cifar10.py:method=ncl "
          "--workdir=gs://bucket/runs/ncl && \"$HOME\"/bayesncl_venv/bin/python"
          " -u -m bayesncl_jax.evaluate --workdir=gs://bucket/runs/ncl;") in job
  cmd = remote_command(only_ssh("tpu_train.sh", *TPU, "--eval_only",
                                "--workdir=gs://bucket/runs/ncl"))
  assert "bayesncl_jax.main" not in cmd
  assert "tmux new-session -d -s bayesncl_eval" in cmd
  assert "-m bayesncl_jax.evaluate --workdir=gs://bucket/runs/ncl;" in cmd
  assert "exclusive" in fails("tpu_train.sh", *TRAIN, "--eval", "--eval_only")
  assert "drop --config" in fails("tpu_train.sh", *TRAIN, "--eval_only")


def test_tpu_train_refuses_a_local_workdir():
  for workdir in ("/home/me/run", "workdirs/run", "gs://", "gcs/bucket"):
    message = fails("tpu_train.sh", *TPU, "--config=configs/cifar10.py",
                    f"--workdir={workdir}")
    assert f"--workdir={workdir} is not a gs:// path" in message
    assert "every worker" in message
  cmd = remote_command(only_ssh(
      "tpu_train.sh", *TPU, "--config=configs/cifar10.py",
      "--workdir=/home/me/run", "--allow_local_workdir"))
  assert "--workdir=/home/me/run" in cmd


def test_tpu_train_nohup_and_options():
  cmd = remote_command(only_ssh(
      "tpu_train.sh", *TRAIN, "--detach=nohup", "--session=exp1",
      "--log_dir=/var/log/b", "--venv=/opt/venv", "--repo_dir=/opt/code"))
  assert cmd.startswith("mkdir -p /var/log/b && (nohup sh -c ")
  assert ">/dev/null 2>&1 </dev/null &)" in cmd and "tmux" not in cmd
  assert "cd /opt/code && { /opt/venv/bin/python -u -m bayesncl_jax.main" in cmd
  assert '/var/log/b/exp1-"$(hostname)".log' in cmd
  assert "--detach=screen" in fails("tpu_train.sh", *TRAIN, "--detach=screen")
  assert "--session=a b" in fails("tpu_train.sh", *TRAIN, "--session=a b")


@pytest.mark.parametrize("detach", ["tmux", "nohup"])
def test_tpu_train_runs_on_a_worker_with_overrides_intact(fake, detach):
  venv_bin = fake.home / "bayesncl_venv/bin"
  write_exe(venv_bin / "python", fake.record("python", 'echo "fake python ran"\n'))
  (fake.home / "bayesncl_jax").mkdir()
  proc = sh("tpu_train.sh", *TRAIN, *TRICKY, "--eval", f"--detach={detach}",
            env=fake.env, check=0)
  assert "t1v-n-test-w-0: started bayesncl, logs in" in proc.stdout
  log = fake.home / "bayesncl_logs/bayesncl-t1v-n-test-w-0.log"
  deadline = time.time() + 20  # nohup: the job runs in the background.
  while "exited" not in (log.read_text() if log.exists() else ""):
    assert time.time() < deadline, "job did not finish"
    time.sleep(0.05)
  assert log.read_text() == ("fake python ran\nfake python ran\n"
                             "[bayesncl] exited with status 0\n")
  main, evaluate = fake.calls("python")
  assert main["argv"] == ["-u", "-m", "bayesncl_jax.main",
                          "--config=configs/cifar10.py:method=ncl",
                          "--workdir=gs://bucket/runs/ncl", *TRICKY]
  assert main["cwd"] == str(fake.home / "bayesncl_jax")
  assert evaluate["argv"] == ["-u", "-m", "bayesncl_jax.evaluate",
                              "--workdir=gs://bucket/runs/ncl"]
  assert bool(fake.calls("tmux")) == (detach == "tmux")


def test_tpu_train_forwards_xla_libtpu_and_named_env(fake):
  """XLA_FLAGS / LIBTPU_INIT_ARGS set here and every --env name reach the
  worker's main and evaluate unchanged; a named variable not set is an
  error, a bad list too."""
  write_exe(fake.home / "bayesncl_venv/bin/python", fake.record("python", """
printf '%s|%s|%s|%s\\n' "$XLA_FLAGS" "$LIBTPU_INIT_ARGS" "$MY_A" "${MY_B-unset}"
"""))
  (fake.home / "bayesncl_jax").mkdir()
  env = {**fake.env, "XLA_FLAGS": "--xla_dump_to=/tmp/d --xla_x='a b'",
         "LIBTPU_INIT_ARGS": "--xla_tpu_enable_x=true", "MY_A": "it's $HOME"}
  sh("tpu_train.sh", *TRAIN, "--eval", "--env=MY_A,XLA_FLAGS", env=env,
     check=0)
  log = fake.home / "bayesncl_logs/bayesncl-t1v-n-test-w-0.log"
  line = ("--xla_dump_to=/tmp/d --xla_x='a b'|--xla_tpu_enable_x=true|"
          "it's $HOME|unset\n")
  assert log.read_text() == 2 * line + "[bayesncl] exited with status 0\n"
  # Nothing set, nothing named: no export at all.
  [argv] = dry("tpu_train.sh", *TRAIN)
  assert "export" not in remote_command(argv)
  assert "names MY_B, which is not set here" in fails("tpu_train.sh", *TRAIN,
                                         "--env=MY_B")
  assert "--env=A;B" in fails("tpu_train.sh", *TRAIN, "--env=A;B")


def test_tpu_train_stage_data_copies_then_trains_from_the_copy(fake):
  """--stage_data: on each worker, gcloud storage rsync from the gs://
  data_dir into DIR, then main (and evaluate) with the local data_dir; a
  failed copy starts no training."""
  write_exe(fake.home / "bayesncl_venv/bin/python", fake.record("python"))
  (fake.home / "bayesncl_jax").mkdir()
  src = "--config.dataset.data_dir=gs://bucket/data/in100"
  sh("tpu_train.sh", *TRAIN, src, *TRICKY[:2], "--eval",
     "--stage_data=~/bayesncl_data", env=fake.env, check=0)
  rsync = [c["argv"] for c in fake.calls("gcloud")
           if c["argv"][:2] == ["storage", "rsync"]]
  assert rsync == [["storage", "rsync", "--recursive", "gs://bucket/data/in100",
                    f"{fake.home}/bayesncl_data"]]
  assert (fake.home / "bayesncl_data").is_dir()
  main, evaluate = fake.calls("python")
  assert main["argv"][3:] == [
      "--config=configs/cifar10.py:method=ncl",
      "--workdir=gs://bucket/runs/ncl", *TRICKY[:2],
      f"--config.dataset.data_dir={fake.home}/bayesncl_data"]
  assert evaluate["argv"][2] == "bayesncl_jax.evaluate"
  # A failed copy: no training, the status in the log.
  (fake.tmp / "calls.log").unlink()
  write_exe(fake.bin / "gcloud", fake.record("gcloud", """
case "$1" in storage) exit 7 ;; esac
for a in "$@"; do
  case $a in --command=*) exec sh -c "${a#--command=}" ;; esac
done
"""))
  sh("tpu_train.sh", *TRAIN, src, f"--stage_data={fake.tmp}/staged",
     env=fake.env, check=0)
  assert fake.calls("python") == []
  log = fake.home / "bayesncl_logs/bayesncl-t1v-n-test-w-0.log"
  assert log.read_text().endswith("[bayesncl] exited with status 7\n")
  assert "--config.dataset.data_dir=gs://" in fails(
      "tpu_train.sh", *TRAIN, "--stage_data=/data")
  assert "absolute path" in fails("tpu_train.sh", *TRAIN, src,
                                  "--stage_data=data")


def test_tpu_train_copies_each_worker_log_to_the_workdir(fake):
  """The worker's log reaches WORKDIR/logs/ when the job ends (and every
  minute while it runs); a local workdir gets no copy."""
  write_exe(fake.home / "bayesncl_venv/bin/python", fake.record(
      "python", 'echo "fake python ran"\n'))
  (fake.home / "bayesncl_jax").mkdir()
  sh("tpu_train.sh", *TRAIN, env=fake.env, check=0)
  log = fake.home / "bayesncl_logs/bayesncl-t1v-n-test-w-0.log"
  copies = [c["argv"] for c in fake.calls("gcloud")
            if c["argv"][:2] == ["storage", "cp"]]
  assert copies == [["storage", "cp", str(log), "gs://bucket/runs/ncl/logs/"
                     "bayesncl-t1v-n-test-w-0.log"]]
  assert log.read_text() == ("fake python ran\n"
                             "[bayesncl] exited with status 0\n")
  (fake.tmp / "calls.log").unlink()
  local = [a for a in TRAIN if not a.startswith("--workdir")]
  sh("tpu_train.sh", *local, "--workdir=/tmp/run", "--allow_local_workdir",
     env=fake.env, check=0)
  assert not [c for c in fake.calls("gcloud") if c["argv"][0] == "storage"]


def test_tpu_train_logs_a_failed_run_and_skips_eval(fake):
  write_exe(fake.home / "bayesncl_venv/bin/python", fake.record(
      "python", 'exit "${FAKE_EXIT:-0}"\n'))
  (fake.home / "bayesncl_jax").mkdir()
  sh("tpu_train.sh", *TRAIN, "--eval", env={**fake.env, "FAKE_EXIT": "3"},
     check=0)
  log = fake.home / "bayesncl_logs/bayesncl-t1v-n-test-w-0.log"
  assert log.read_text().endswith("[bayesncl] exited with status 3\n")
  assert len(fake.calls("python")) == 1


# -------------------------------------------------------------- tpu_kill ----

KILL_PATTERN = ("^([^ ]*/)?bayesncl_venv/bin/python[0-9.]* (-u )?-m "
                "bayesncl_jax[.](main|evaluate)( |$)")


def test_tpu_kill_command(fake):
  argv = only_ssh("tpu_kill.sh", *TPU, "--project=p")
  cmd = remote_command(argv)
  assert "--project=p" in argv
  assert f"sudo pkill -TERM -f '{KILL_PATTERN}'" in cmd
  assert f"sudo pkill -KILL -f '{KILL_PATTERN}'" in cmd
  assert "[ $i -lt 300 ]" in cmd  # waits for the checkpoint, then KILL
  assert "sudo fuser -k /dev/accel* /dev/vfio/*" in cmd
  assert "sudo lsof -w /dev/accel* /dev/vfio/*" in cmd
  assert "sudo rm -f /tmp/libtpu_lockfile" in cmd
  # Only the job's python process: not the tmux server or the sh -c
  # wrapper that tpu_train.sh starts (their command lines mention main too),
  # nor the remote shell running this very command.
  job = _job(remote_command(only_ssh("tpu_train.sh", *TRAIN)))
  python = ("/home/u/bayesncl_venv/bin/python -u -m bayesncl_jax.main "
            "--config=c --workdir=gs://b/r")
  assert re.search(KILL_PATTERN, python)
  assert re.search(KILL_PATTERN, python.replace("main", "evaluate"))
  for other in (f"tmux new-session -d -s bayesncl {job}", f"sh -c {job}",
                f"bash -c {cmd}", python.replace(".main", ".mainx")):
    assert not re.search(KILL_PATTERN, other), other
  assert f"--timeout=x" in fails("tpu_kill.sh", *TPU, "--timeout=x")
  # Executed on a fake worker (sudo only records): every step runs.
  proc = sh("tpu_kill.sh", *TPU, env=fake.env, check=0)
  assert proc.stdout.endswith("t1v-n-test-w-0: TPU free\n")
  sudo = [c["argv"][:3] for c in fake.calls("sudo")]
  assert sudo == [["pkill", "-TERM", "-f"], ["pgrep", "-f", KILL_PATTERN],
                  ["pkill", "-KILL", "-f"], ["lsof", "-w", sudo[3][2]],
                  ["fuser", "-k", sudo[4][2]],
                  ["rm", "-f", "/tmp/libtpu_lockfile"]]


def test_tpu_kill_signals_python_and_waits_for_its_checkpoint(fake):
  """Real pkill/pgrep on real processes named like the job's: the python
  process gets SIGTERM and the time to save; the tmux server and the
  wrapper shell (decoys) are left alone. A unique venv name keeps the
  pattern off any other process of this machine."""
  venv = f"venv_{uuid.uuid4().hex[:8]}"
  job = f"/w/{venv}/bin/python -u -m bayesncl_jax.main --workdir=gs://b/r"
  saved = fake.tmp / "saved"
  # The "job": on SIGTERM it takes 2 s to save, then exits 143 like main.
  script = write_exe(fake.tmp / "job.sh", f"""#!/bin/bash
trap 'sleep 2; echo step > "{saved}"; exit 143' TERM
while :; do sleep 0.1; done
""")
  procs = [subprocess.Popen(["bash", "-c", f'exec -a "{name}" {cmd}'])
           for name, cmd in (
               (job, f"bash {script}"),
               (f"tmux new-session -d -s bayesncl cd x && {{ {job}; }}",
                "sleep 60"),
               (f"sh -c cd x && {{ {job}; }}", "sleep 60"))]
  try:
    time.sleep(0.5)  # the trap is set
    # sudo: run pkill/pgrep for real, record the rest.
    (fake.bin / "pgrep").unlink()
    write_exe(fake.bin / "sudo", fake.record(
        "sudo", 'case $1 in pkill|pgrep) exec "$@" ;; esac\n'))
    proc = sh("tpu_kill.sh", *TPU, f"--venv=/w/{venv}", "--timeout=30",
              env=fake.env, check=0)
    assert "SIGTERM sent, waiting up to 30s" in proc.stdout
    assert "killed (no checkpoint)" not in proc.stdout
    assert procs[0].wait(timeout=10) == 143
    assert saved.read_text() == "step\n"
    assert procs[1].poll() is None and procs[2].poll() is None
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


# ----------------------------------------------------------- tpu_recover ----

def test_tpu_recover_dry_run_shows_the_whole_sequence():
  cmds = dry("tpu_recover.sh", *VALID["tpu_recover.sh"], "--spot", *TRICKY)
  assert [c[:5] for c in cmds] == [
      ["gcloud", "compute", "tpus", "tpu-vm", "delete"],
      ["gcloud", "compute", "tpus", "tpu-vm", "create"],
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],   # setup
      ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]   # train
  assert cmds[0][-1] == "--quiet" and cmds[1][-1] == "--spot"
  assert "-m venv" in remote_command(cmds[2])
  job = _job(remote_command(cmds[3]))
  assert shlex.split(job[job.index("{ ") + 2:job.index("; }")])[4:] == [
      "--config=configs/cifar10.py:method=ncl",
      "--workdir=gs://bucket/runs/ncl", *TRICKY]
  queued = dry("tpu_recover.sh", *VALID["tpu_recover.sh"], "--queued",
               "--spot")
  assert [c[3:5] for c in queued[:3]] == [["queued-resources", "delete"],
                                          ["queued-resources", "create"],
                                          ["queued-resources", "describe"]]
  assert "gs://" in fails("tpu_recover.sh", *[
      a for a in VALID["tpu_recover.sh"] if not a.startswith("--workdir")],
      "--workdir=/local/run")


@pytest.mark.parametrize("state, recreated", [("PREEMPTED", True),
                                              ("READY", False)])
def test_tpu_recover_recreates_only_a_lost_vm(fake, state, recreated):
  _setup_fakes(fake)
  write_exe(fake.bin / "gcloud", fake.record("gcloud", f"""
case "$*" in *"tpu-vm describe"*) echo {state}; exit 0 ;; esac
for a in "$@"; do
  case $a in --command=*) exec sh -c "${{a#--command=}}" ;; esac
done
"""))
  write_exe(fake.bin / "tmux", fake.record("tmux"))
  proc = sh("tpu_recover.sh", *VALID["tpu_recover.sh"], "--spot",
            env=fake.env, check=0)
  verbs = [" ".join(c["argv"][2:4]) for c in fake.calls("gcloud")]
  if recreated:  # describe, delete, create, setup, train
    expected = ["tpu-vm describe", "tpu-vm delete", "tpu-vm create",
                "tpu-vm ssh", "tpu-vm ssh"]
  else:  # describe, setup, kill stale processes, train
    expected = ["tpu-vm describe", "tpu-vm ssh", "tpu-vm ssh", "tpu-vm ssh"]
  assert verbs == expected, proc.stderr
  assert f"pod is {state}" in proc.stderr
  assert "started bayesncl" in proc.stdout


@pytest.mark.parametrize("states, verbs, code", [
    # Still starting: wait, then it is READY: nothing deleted.
    (["CREATING", "STARTING", "READY"], ["describe"] * 3, 0),
    # Repairing, then preempted: delete and create.
    (["REPAIRING", "PREEMPTED"], ["describe"] * 2 + ["delete", "create"], 0),
    # Gone: create again.
    (["NOT_FOUND"], ["describe", "delete", "create"], 0),
    # The query fails (permissions, network): stop, delete nothing.
    (["ERROR"], ["describe"], 2),
])
def test_tpu_recover_waits_on_transitions_and_never_deletes_blindly(
    fake, states, verbs, code):
  _setup_fakes(fake)
  answers = fake.tmp / "states"
  answers.write_text("\n".join(states) + "\n")
  write_exe(fake.bin / "gcloud", fake.record("gcloud", f"""
case "$*" in *"tpu-vm describe"*)
  state=$(head -n 1 "{answers}"); sed -i 1d "{answers}"
  [ -s "{answers}" ] || echo "$state" > "{answers}"
  case $state in
    NOT_FOUND) echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found" >&2; exit 1 ;;
    ERROR) echo "ERROR: (gcloud) PERMISSION_DENIED: no" >&2; exit 1 ;;
  esac
  echo "$state"; exit 0 ;;
esac
for a in "$@"; do
  case $a in --command=*) exec sh -c "${{a#--command=}}" ;; esac
done
"""))
  write_exe(fake.bin / "tmux", fake.record("tmux"))
  args = [*VALID["tpu_recover.sh"], "--preemptible", "--poll=1",
          "--python=python3", "--env=MY_A", "--stage_data=/data"]
  proc = sh("tpu_recover.sh", *args, "--config.dataset.data_dir=gs://b/d",
            env={**fake.env, "MY_A": "1"})
  assert proc.returncode == code, proc.stderr
  calls = fake.calls("gcloud")
  tpu_verbs = [c["argv"][3] for c in calls if c["argv"][2] == "tpu-vm"
               and c["argv"][3] != "ssh"]
  assert tpu_verbs == verbs, proc.stderr
  if code:
    assert "could not query pod (nothing deleted): ERROR: (gcloud) " \
        "PERMISSION_DENIED" in proc.stderr
    return
  create = [c["argv"] for c in calls
            if c["argv"][2:4] == ["tpu-vm", "create"]]
  assert all(argv[-1] == "--preemptible" for argv in create)
  ssh = [c["argv"] for c in calls if c["argv"][2:4] == ["tpu-vm", "ssh"]]
  setup, train_cmd = (remote_command(["gcloud", *argv])
                      for argv in (ssh[0], ssh[-1]))
  assert "PY=python3;" in setup
  assert "export MY_A=1" in train_cmd and "rsync" in train_cmd


def test_tpu_recover_rejects_spot_with_preemptible():
  assert "exclusive" in fails("tpu_recover.sh", *VALID["tpu_recover.sh"],
                              "--spot", "--preemptible")


# ------------------------------------------------- dry run == real run ----

@pytest.mark.parametrize("script", [s for s in ENTRY_POINTS if s not in MULTI])
def test_dry_run_prints_exactly_what_runs(fake, script):
  # gcloud that records and does nothing else.
  write_exe(fake.bin / "gcloud", fake.record("gcloud"))
  [printed] = dry(script, *VALID[script], *(
      TRICKY if script == "tpu_train.sh" else []))
  assert not fake.calls()
  proc = sh(script, *VALID[script], *(
      TRICKY if script == "tpu_train.sh" else []), env=fake.env, check=0)
  [call] = fake.calls("gcloud")
  assert ["gcloud", *call["argv"]] == printed
  assert shlex.split(proc.stderr.splitlines()[0][2:]) == printed


def test_tpu_scripts_need_gcloud_unless_dry_run(tmp_path):
  # A PATH with only what the scripts need besides gcloud.
  for tool in ("bash", "dirname", "basename", "tr"):
    (tmp_path / tool).symlink_to(shutil.which(tool))
  proc = sh("tpu_kill.sh", *TPU, env=dict(os.environ, PATH=str(tmp_path)))
  assert proc.returncode == 2
  assert "'gcloud' not found on PATH" in proc.stderr
  assert "--dry-run" in proc.stderr


# ------------------------------------------------------------- gpu_train ----

def test_gpu_train_single_node():
  [main] = dry("gpu_train.sh", "--config=configs/cifar100.py:method=cl",
               "--workdir=/data/runs/cl", *TRICKY)
  assert main == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
                  "NCCL_DEBUG=WARN", "python3", "-m", "bayesncl_jax.main",
                  "--config=configs/cifar100.py:method=cl",
                  "--workdir=/data/runs/cl", *TRICKY]


def test_gpu_train_multi_node_and_eval_on_process_zero():
  dist = ["--coordinator_address=10.0.0.1:1234", "--num_processes=2"]
  main, evaluate = dry("gpu_train.sh", *VALID["gpu_train.sh"], *dist,
                       "--process_id=0", "--eval", "--gpus=0,1",
                       "--nccl_socket_ifname=eth0", "--mem_fraction=.8")
  assert main[:5] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=.8",
                      "NCCL_DEBUG=WARN", "CUDA_VISIBLE_DEVICES=0,1",
                      "NCCL_SOCKET_IFNAME=eth0"]
  assert main[5:] == ["python3", "-m", "bayesncl_jax.main",
                      "--config=configs/cifar10.py", "--workdir=/tmp/w",
                      *dist, "--process_id=0"]
  assert evaluate[5:] == ["python3", "-m", "bayesncl_jax.evaluate",
                          "--workdir=/tmp/w"]
  [main] = dry("gpu_train.sh", *VALID["gpu_train.sh"], *dist,
               "--process_id=1", "--eval")
  assert main[-1] == "--process_id=1"
  [evaluate] = dry("gpu_train.sh", "--workdir=/tmp/w", "--eval_only")
  assert evaluate[3:] == ["python3", "-m", "bayesncl_jax.evaluate",
                          "--workdir=/tmp/w"]


def test_gpu_train_validation():
  good = VALID["gpu_train.sh"]
  message = fails("gpu_train.sh", *good, "--num_processes=2")
  assert "--coordinator_address" in message and "--process_id" in message
  dist = ["--coordinator_address=h:1", "--num_processes=2"]
  assert "--process_id=2" in fails("gpu_train.sh", *good, *dist,
                                   "--process_id=2")
  assert "--process_id=01" in fails("gpu_train.sh", *good, *dist,
                                    "--process_id=01")
  assert "HOST:PORT" in fails("gpu_train.sh", *good, "--coordinator_address=h",
                              "--num_processes=2", "--process_id=0")
  assert "--num_processes=0" in fails("gpu_train.sh", *good,
                                      "--coordinator_address=h:1",
                                      "--num_processes=0", "--process_id=0")
  for bad in ("1.5", "0", "0.0", "x"):
    assert f"--mem_fraction={bad}" in fails("gpu_train.sh", *good,
                                            f"--mem_fraction={bad}")
  assert "--gpus=0;1" in fails("gpu_train.sh", *good, "--gpus=0;1")


def test_gpu_train_runs_with_env(fake):
  python = write_exe(fake.bin / "mypython", fake.record(
      "python", 'exit "${FAKE_EXIT:-0}"\n'))
  env = {**fake.env, "NCCL_DEBUG": "INFO",
         "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.7"}
  proc = sh("gpu_train.sh", *VALID["gpu_train.sh"], *TRICKY, "--eval",
            f"--python={python}", "--gpus=1", env=env, check=0)
  main, evaluate = fake.calls("python")
  assert main["argv"] == ["-m", "bayesncl_jax.main",
                          "--config=configs/cifar10.py", "--workdir=/tmp/w",
                          *TRICKY]
  assert main["env"] == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.7",
                         "NCCL_DEBUG": "INFO", "CUDA_VISIBLE_DEVICES": "1",
                         "NCCL_SOCKET_IFNAME": None}
  assert evaluate["argv"] == ["-m", "bayesncl_jax.evaluate", "--workdir=/tmp/w"]
  printed = [shlex.split(l[2:]) for l in proc.stderr.splitlines()
             if l.startswith("+ ")]
  assert printed[0] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.7",
                        "NCCL_DEBUG=INFO", "CUDA_VISIBLE_DEVICES=1",
                        str(python), *main["argv"]]
  # A failed training run stops the script before evaluation.
  (fake.tmp / "calls.log").unlink()
  proc = sh("gpu_train.sh", *VALID["gpu_train.sh"], "--eval",
            f"--python={python}", env={**env, "FAKE_EXIT": "5"})
  assert proc.returncode == 5 and len(fake.calls("python")) == 1


# ------------------------------------------------------------ shellcheck ----

def test_shellcheck_passes_on_every_script():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (CI installs it: apt-get "
                "install shellcheck)")
  proc = subprocess.run(
      ["shellcheck", "--external-sources", "--severity=style",
       *(str(LAUNCH / s) for s in SCRIPTS), str(LAUNCH / "gpu_slurm.sbatch")],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_script_is_strict_bash():
  for script in SCRIPTS:
    text = (LAUNCH / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n"), script
    if script != "common.sh":
      assert "set -euo pipefail" in text, script
      assert os.access(LAUNCH / script, os.X_OK), script


def test_readme_dry_run_examples_are_current():
  """Each ```console block of launch/README.md is rerun and compared."""
  readme = (LAUNCH / "README.md").read_text()
  [tpu] = re.findall(r'^TPU="(.*?)"', readme, flags=re.M)
  blocks = re.findall(r"```console\n(.*?)```", readme, flags=re.S)
  assert len(blocks) >= 7
  for block in blocks:
    command, _, expected = block.partition("\n+ ")
    command = command.replace("\\\n", " ")  # continuation lines
    assert command.startswith("$ launch/"), block
    proc = subprocess.run(["bash", "-c", command[2:]], cwd=LAUNCH.parent,
                          env=dict(clean_env(), TPU=tpu), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "+ " + expected, command


# ------------------------------------------------------- gpu_setup, SLURM ----

def test_gpu_setup_one_pip_call_with_the_pinned_cuda_jax(fake):
  """A 3.10 venv is rebuilt with python3.11; requirements.txt and
  jax[cuda12] at the requirements' jax pin go through ONE pip resolution."""
  fake_python(fake, fake.bin / "python3", (3, 10), name="python3")
  fake_python(fake, fake.bin / "python3.11", (3, 11), name="python3.11")
  for tool in ("cp", "sed"):
    if not (fake.bin / tool).exists():
      (fake.bin / tool).symlink_to(shutil.which(tool))
  venv = fake.tmp / "venv"
  (venv / "bin").mkdir(parents=True)
  stale = venv / "bin" / "python"
  stale.write_bytes((fake.tmp / "venv_python_310").read_bytes())
  stale.chmod(0o755)
  proc = sh("gpu_setup.sh", f"--venv={venv}", env=fake.env, check=0)
  assert "was made by another Python version: rebuilding it with python3.11" \
      in proc.stderr
  repo = LAUNCH.parent
  jax_pin = re.search(r"^jax==(\S+)$", (repo / "requirements.txt").read_text(),
                      flags=re.M)[1]
  assert _pips(fake) == [
      ["-m", "pip", "install", "-q", "-U", "pip"],
      ["-m", "pip", "install", "-q", "-r", f"{repo}/requirements.txt",
       f"jax[cuda12]=={jax_pin}"],
      ["-m", "pip", "install", "-q", "--no-deps", "-e", str(repo)]]
  assert ("python3.11", ["-m", "venv"]) in _progs(fake.calls())
  # Again: the venv is kept.
  (fake.tmp / "calls.log").unlink()
  proc = sh("gpu_setup.sh", f"--venv={venv}", env=fake.env, check=0)
  assert ("python3.11", ["-m", "venv"]) not in _progs(fake.calls())
  assert "rebuilding" not in proc.stderr


def test_gpu_setup_without_python311_names_the_fix(fake):
  fake_python(fake, fake.bin / "python3", (3, 10), name="python3")
  proc = sh("gpu_setup.sh", "--dry-run", env=fake.env)
  assert proc.returncode == 2
  assert "no Python >= 3.11 found" in proc.stderr
  assert "apt-get install python3.11" in proc.stderr


def test_gpu_slurm_sbatch_starts_one_process_per_node(fake, tmp_path):
  """The sbatch script under a fake srun (two tasks) and scontrol: each
  task runs gpu_train.sh with the first node as coordinator and its own
  SLURM_PROCID; --dry-run is passed through, so each prints its command."""
  write_exe(fake.bin / "scontrol", "#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
  srun_env = tmp_path / "srun_env"
  write_exe(fake.bin / "srun", f"""#!/bin/bash
echo "SRUN_CPUS_PER_TASK=${{SRUN_CPUS_PER_TASK-unset}}" > "{srun_env}"
while [[ $1 == --* ]]; do shift; done
for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" || exit; done
""")
  env = {**fake.env, "SLURM_JOB_NODELIST": "gpu-[a-b]", "SLURM_NTASKS": "2",
         "SLURM_SUBMIT_DIR": str(LAUNCH.parent), "SLURM_CPUS_PER_TASK": "32"}
  proc = subprocess.run(
      ["bash", str(LAUNCH / "gpu_slurm.sbatch"), "--config=configs/c.py",
       "--workdir=gs://bucket/run", *TRICKY, "--dry-run"],
      capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode == 0, proc.stderr
  # srun >= 22.05 ignores the allocation's --cpus-per-task without it.
  assert srun_env.read_text() == "SRUN_CPUS_PER_TASK=32\n"
  cmds = [shlex.split(line[2:]) for line in proc.stdout.splitlines()]
  python = f"{LAUNCH.parent}/.venv/bin/python"
  assert cmds == [
      ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "NCCL_DEBUG=WARN", python,
       "-m", "bayesncl_jax.main", "--config=configs/c.py",
       "--workdir=gs://bucket/run", "--coordinator_address=gpu-a:12345",
       "--num_processes=2", f"--process_id={i}", *TRICKY] for i in (0, 1)]
  # Outside an allocation: a clear error.
  env.pop("SLURM_JOB_NODELIST")
  proc = subprocess.run(["bash", str(LAUNCH / "gpu_slurm.sbatch")],
                        capture_output=True, text=True, env=env, timeout=60)
  assert proc.returncode != 0 and "run this with sbatch" in proc.stderr


@pytest.mark.parametrize("eval_after", [False, True])
@pytest.mark.parametrize("sig", ["TERM", "HUP"])
def test_gpu_train_signal_to_the_wrapper_reaches_python(fake, eval_after,
                                                        sig):
  """A signal sent to gpu_train.sh's pid only (as a supervisor or a
  scheduler sends it) reaches Python, which saves and exits 143; the
  wrapper exits 143 too, skips --eval and leaves no process behind."""
  saved, pid_file = fake.tmp / "saved", fake.tmp / "python.pid"
  # The fake main: saves on TERM/HUP (as train.py does), exits 143.
  python = write_exe(fake.bin / "mypython", fake.record("python", f"""
case "$*" in *bayesncl_jax.evaluate*) exit 0 ;; esac
echo $$ > "{pid_file}"
trap 'echo step > "{saved}"; exit 143' TERM HUP INT
while :; do sleep 0.05; done
"""))
  args = [*VALID["gpu_train.sh"], f"--python={python}"]
  # A SIGHUP ignored by whatever started the test (nohup) would be ignored
  # by bash for good (a signal ignored on entry cannot be trapped): start
  # the wrapper with SIGHUP at its default, as a terminal or tmux does.
  wrapper = subprocess.Popen(
      ["bash", str(LAUNCH / "gpu_train.sh"), *args,
       *(["--eval"] if eval_after else [])],
      env=fake.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
  try:
    deadline = time.time() + 20
    while not pid_file.exists():
      assert wrapper.poll() is None and time.time() < deadline
      time.sleep(0.05)
    time.sleep(0.3)  # the fake's trap is set
    python_pid = int(pid_file.read_text())
    # exec'd without --eval (same pid); a child with --eval.
    assert (python_pid == wrapper.pid) != eval_after
    os.kill(wrapper.pid, getattr(signal, f"SIG{sig}"))
    _, err = wrapper.communicate(timeout=20)
  finally:
    if wrapper.poll() is None:
      wrapper.kill()
    if pid_file.exists() and wrapper.returncode != 143:  # a failed run
      with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
  assert wrapper.returncode == 143, err
  assert saved.read_text() == "step\n"
  assert [c["argv"][1] for c in fake.calls("python")] == ["bayesncl_jax.main"]
  with pytest.raises(ProcessLookupError):  # no orphan
    os.kill(python_pid, 0)
