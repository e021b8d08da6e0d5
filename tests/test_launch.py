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

import os
import re
import shlex
import shutil
import subprocess
import time
import types
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
    "gpu_train.sh": ["--config=configs/cifar10.py", "--workdir=/tmp/w"],
}
REQUIRED = {
    "tpu_create.sh": ["name", "zone", "accelerator_type", "version"],
    "tpu_setup.sh": ["name", "zone", "repo"],
    "tpu_train.sh": ["name", "zone", "config", "workdir"],
    "tpu_kill.sh": ["name", "zone"],
    "tpu_delete.sh": ["name", "zone"],
    "gpu_train.sh": ["config", "workdir"],
}


def sh(script, *args, env=None, check=None):
  """Runs launch/SCRIPT with ARGS; returns the CompletedProcess."""
  proc = subprocess.run(["bash", str(LAUNCH / script), *args],
                        capture_output=True, text=True, timeout=60, env=env)
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

  write_exe(bin_dir / "sudo", record("sudo"))  # never runs anything.
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
  env = dict(os.environ, HOME=str(home), FAKE_CALLS=str(calls),
             PATH=f"{bin_dir}:{os.environ['PATH']}")

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


@pytest.mark.parametrize("script", ENTRY_POINTS)
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
  flag = "workdir" if script == "gpu_train.sh" else "zone"
  assert f"--{flag} needs a value" in fails(script, *good, f"--{flag}",
                                            "somewhere")
  assert "--dry_run is a switch" in fails(script, *good, "--dry-run=yes")
  if script not in ("tpu_train.sh", "gpu_train.sh"):
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


def test_tpu_create_queued():
  [argv] = dry("tpu_create.sh", *TPU, "--accelerator_type=v5litepod-16",
               "--version=v2-alpha-tpuv5-lite", "--queued", "--spot")
  assert argv == ["gcloud", "compute", "tpus", "queued-resources", "create",
                  "pod", "--node-id=pod", "--zone=us-central2-b",
                  "--accelerator-type=v5litepod-16",
                  "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]


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
  assert "python3 -m venv" in cmd
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


def _setup_fakes(fake, have_ensurepip=True):
  """System python3 and git for the setup script, recording their calls."""
  venv_python = fake.record("python", 'echo "fake python ran"\n')
  write_exe(fake.bin / "python3", fake.record("python3") + f"""
case "$1 $2" in
  "-c import ensurepip") exit {0 if have_ensurepip else 1} ;;
  "-m venv") mkdir -p "$3/bin" && cat > "$3/bin/python" <<'EOF'
{venv_python}EOF
chmod +x "$3/bin/python" ;;
esac
""")
  write_exe(fake.bin / "git", fake.record("git", """
if [ "$1" = clone ]; then eval "dir=\\${$#}"; mkdir -p "$dir/.git"; fi
"""))


def _progs(calls):
  return [(c["prog"], c["argv"][:2]) for c in calls]


def test_tpu_setup_runs_on_a_worker_and_is_idempotent(fake):
  _setup_fakes(fake)
  args = [*VALID["tpu_setup.sh"], "--branch=dev"]
  first = sh("tpu_setup.sh", *args, env=fake.env, check=0)
  assert "fake python ran" in first.stdout  # the import check at the end
  calls = fake.calls()
  assert _progs(calls)[0] == ("gcloud", ["compute", "tpus"])
  assert ("python3", ["-m", "venv"]) in _progs(calls)
  assert ("git", ["clone", "-q"]) in _progs(calls)
  assert not fake.calls("sudo")  # git, tmux and ensurepip were there
  pips = [c["argv"] for c in fake.calls("python") if c["argv"][:2] ==
          ["-m", "pip"]]
  home = str(fake.home)
  assert pips == [
      ["-m", "pip", "install", "-q", "-U", "pip"],
      ["-m", "pip", "install", "-q", "-r", f"{home}/bayesncl_jax/requirements.txt"],
      ["-m", "pip", "install", "-q", "--no-deps", "-e", f"{home}/bayesncl_jax"],
      ["-m", "pip", "install", "-q", "-U", "jax[tpu]==0.10.2"]]
  assert (fake.home / "bayesncl_venv/bin/python").exists()

  (fake.tmp / "calls.log").unlink()
  sh("tpu_setup.sh", *args, env=fake.env, check=0)
  progs = _progs(fake.calls())
  assert ("python3", ["-m", "venv"]) not in progs  # venv kept
  assert ("git", ["clone", "-q"]) not in progs     # checkout updated instead
  git = [c["argv"] for c in fake.calls("git")]
  assert git == [["-C", f"{home}/bayesncl_jax", "fetch", "-q", "origin", "dev"],
                 ["-C", f"{home}/bayesncl_jax", "checkout", "-q", "dev"],
                 ["-C", f"{home}/bayesncl_jax", "merge", "-q", "--ff-only",
                  "FETCH_HEAD"]]


def test_tpu_setup_installs_missing_system_packages(fake):
  _setup_fakes(fake, have_ensurepip=False)
  sh("tpu_setup.sh", *VALID["tpu_setup.sh"], "--python=python3", env=fake.env,
     check=0)
  sudo = [c["argv"] for c in fake.calls("sudo")]
  assert sudo[1][-5:] == ["-y", "-qq", "git", "tmux", "python3-venv"]


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
  assert job.startswith('cd "$HOME"/bayesncl_jax && {')
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

def test_tpu_kill_command(fake):
  argv = only_ssh("tpu_kill.sh", *TPU, "--project=p")
  cmd = remote_command(argv)
  assert "--project=p" in argv
  pattern = "bayesncl_jax[.](main|evaluate)"
  assert f'sudo pkill -TERM -f "{pattern}"' in cmd
  assert f'sudo pkill -KILL -f "{pattern}"' in cmd
  assert "sudo fuser -k /dev/accel* /dev/vfio/*" in cmd
  assert "sudo lsof -w /dev/accel* /dev/vfio/*" in cmd
  assert "sudo rm -f /tmp/libtpu_lockfile" in cmd
  # pkill -f must find the jobs but not the shell running this command.
  assert re.search(pattern, "python -u -m bayesncl_jax.main --config=c")
  assert re.search(pattern, "python -u -m bayesncl_jax.evaluate --workdir=w")
  assert not re.search(pattern, cmd)
  # Executed on a fake worker (sudo only records): every step runs.
  proc = sh("tpu_kill.sh", *TPU, env=fake.env, check=0)
  assert proc.stdout.endswith("t1v-n-test-w-0: TPU free\n")
  sudo = [c["argv"][:3] for c in fake.calls("sudo")]
  assert sudo == [["pkill", "-TERM", "-f"], ["pkill", "-KILL", "-f"],
                  ["lsof", "-w", sudo[2][2]], ["fuser", "-k", sudo[3][2]],
                  ["rm", "-f", "/tmp/libtpu_lockfile"]]


# ------------------------------------------------- dry run == real run ----

@pytest.mark.parametrize("script", [s for s in ENTRY_POINTS if s != "gpu_train.sh"])
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
       *(str(LAUNCH / s) for s in SCRIPTS)],
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
                          env=dict(os.environ, TPU=tpu), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "+ " + expected, command
