"""Multi-process start-up: `jax.distributed.initialize` with clear errors.

Single process (a laptop, one GPU host driving all its GPUs): nothing to do.
Cloud TPU VM with several hosts (a pod slice: v4-32, v5litepod-16, ...):
every worker runs the same command and `jax.distributed.initialize()` is
called with no arguments, so that JAX's own cluster detection finds the
coordinator, the process count and this worker's index (from the GCE
metadata server on gcloud-created TPU VMs, from TPU_WORKER_HOSTNAMES /
TPU_PROCESS_ADDRESSES on GKE). See `plan` for how a pod is recognised.
GPU clusters (SLURM or by hand): --coordinator_address=host:port
--num_processes=N --process_id=i on every process (or the JAX_* environment
variables).

With an explicit coordinator address, the processes first meet in a small
TCP handshake on the coordinator's port (`rendezvous`), then call
`jax.distributed.initialize`. Why: when a peer never starts, XLA's
coordination client does not raise, it aborts the whole process
(SIGABRT, "another task died ... DEADLINE_EXCEEDED") — a misleading crash
instead of an error saying which process is missing.
"""
from __future__ import annotations

import os
import socket
import time

from absl import flags
from absl import logging
import jax

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs "
                      "outside Cloud TPU.")
  flags.DEFINE_integer("num_processes", None, "Total number of processes.")
  flags.DEFINE_integer("process_id", None, "This process's index.")
  flags.DEFINE_integer("distributed_timeout", 300,
                       "Seconds to wait for all processes to join.")
  flags.DEFINE_bool("distributed", None,
                    "Force (True) or skip (False) jax.distributed "
                    "initialisation; default: on when multi-process "
                    "settings are given or this is a TPU VM of a slice "
                    "with more than one host.")


# PCI ids of Cloud TPU chips (vendor Google): a copy of JAX's table
# (jax._src.hardware_utils, private, so not imported here);
# tests/test_distributed.py checks that the two still agree.
_GOOGLE_PCI_VENDOR = "0x1ae0"
_TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063",
                    "0x006f", "0x0076")
_METADATA_URL = ("http://{host}/computeMetadata/v1/instance/attributes/"
                 "worker-network-endpoints")


def on_tpu_vm(pci_root: str = "/sys/bus/pci/devices") -> bool:
  """True on a Cloud TPU VM: a Google TPU chip is on this host's PCI bus.

  Local files only, no network: the check JAX itself makes before it asks
  the metadata server anything.
  """
  try:
    devices = os.listdir(pci_root)
  except OSError:
    return False
  for device in devices:
    try:
      with open(os.path.join(pci_root, device, "vendor")) as f:
        vendor = f.read().strip()
      if vendor != _GOOGLE_PCI_VENDOR:
        continue
      with open(os.path.join(pci_root, device, "device")) as f:
        if f.read().strip() in _TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def gce_tpu_worker_endpoints(timeout: float = 5.0) -> str | None:
  """The `worker-network-endpoints` metadata of a gcloud-created TPU VM.

  One comma-separated entry per host of the slice; None when the metadata
  server does not answer (not GCE) or has no such attribute.
  """
  import urllib.request  # pylint: disable=g-import-not-at-top
  host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(_METADATA_URL.format(host=host),
                                   headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.read().decode()
  except OSError:
    return None


def tpu_host_count(env=None, metadata=gce_tpu_worker_endpoints) -> int:
  """Hosts of this TPU slice: GKE's environment, else the GCE metadata."""
  env = os.environ if env is None else env
  for key in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
    if env.get(key):
      return len([h for h in env[key].split(",") if h.strip()])
  endpoints = metadata()
  if not endpoints:
    return 1
  return len([e for e in endpoints.split(",") if e.strip()])


def plan(coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         *, force: bool | None = None, env=None, tpu_vm=on_tpu_vm,
         tpu_hosts=tpu_host_count) -> str:
  """How this process joins a multi-process run: a pure decision.

  Returns "explicit" (coordinator address, process count and id given: GPU
  hosts, SLURM), "auto" (`jax.distributed.initialize()` with no arguments:
  a TPU VM with more than one host, or --distributed without settings) or
  "none" (one process). `force=False` (--nodistributed) always gives
  "none". The settings come from the arguments, else the JAX_* variables of
  `env`; `tpu_vm()` and `tpu_hosts()` are asked only when none are given.
  """
  env = os.environ if env is None else env
  explicit = [coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"),
              num_processes if num_processes is not None
              else env.get("JAX_NUM_PROCESSES"),
              process_id if process_id is not None
              else env.get("JAX_PROCESS_ID")]
  if force is False:
    return "none"
  if any(v is not None for v in explicit):
    return "explicit"
  if force:
    return "auto"
  if tpu_vm() and tpu_hosts() > 1:
    return "auto"
  return "none"


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None, *, timeout: int = 300,
               force: bool | None = None) -> bool:
  """Joins the multi-process runtime when there is one; returns whether.

  See `plan` for when. A process that cannot reach the others within
  `timeout` seconds raises a RuntimeError that says which settings to
  check, instead of hanging; with an explicit coordinator address it is a
  RendezvousError that names the processes that never joined (see
  `rendezvous`).
  """
  how = plan(coordinator_address, num_processes, process_id, force=force)
  if how == "none":
    return False
  if how == "auto":
    logging.info("Multi-host TPU VM (or --distributed): "
                 "jax.distributed.initialize() with JAX's cluster detection.")
    try:
      jax.distributed.initialize(initialization_timeout=timeout)
    except Exception as e:  # the runtime raises XlaRuntimeError & co.
      raise RuntimeError(
          f"This TPU worker could not join the other hosts of its slice "
          f"within {timeout}s ({type(e).__name__}: {e}). Start the same "
          "command on every worker at once (launch/tpu_train.sh uses "
          "--worker=all), and free the TPU of stale processes first "
          "(launch/tpu_kill.sh).") from e
    return True
  coordinator_address = coordinator_address or os.environ.get(
      "JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  explicit = [coordinator_address, num_processes, process_id]
  if any(v is None for v in explicit):
    raise ValueError(
        "Multi-process runs need all of --coordinator_address, "
        "--num_processes and --process_id (got "
        f"coordinator_address={coordinator_address}, "
        f"num_processes={num_processes}, process_id={process_id}).")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in "
                     f"[0, {num_processes}).")
  if num_processes > 1:
    rendezvous(coordinator_address, num_processes, process_id, timeout)
  logging.info("jax.distributed.initialize(%s, %s, %s)", coordinator_address,
               num_processes, process_id)
  try:
    jax.distributed.initialize(coordinator_address, num_processes,
                               process_id, initialization_timeout=timeout)
  except Exception as e:  # the runtime raises XlaRuntimeError & co.
    raise RuntimeError(
        f"Process {process_id} could not join the multi-process run at "
        f"{coordinator_address} within {timeout}s ({type(e).__name__}: {e})."
        f" Did you start the same command on all {num_processes} "
        "hosts/processes, with the same --coordinator_address and "
        "--num_processes, and is the coordinator's port reachable?") from e
  return True


class RendezvousError(RuntimeError):
  """The processes of a multi-process run did not all join, or disagree."""


_HINT = ("Start the same command on all {n} processes with the same "
         "--coordinator_address and --num_processes and distinct "
         "--process_id in [0, {n}); the coordinator's port must be reachable "
         "from every host.")
# Seconds between connection attempts of a process waiting for process 0.
_RETRY_S = 0.2
# A connected process waits this much past its own deadline for process 0's
# verdict: process 0 started its clock at another moment, and its answer
# says which processes are missing.
_REPLY_GRACE_S = 5.0


def _split_address(address: str) -> tuple[str, int]:
  host, sep, port = address.rpartition(":")
  if not sep or not port.isdigit():
    raise ValueError(f"--coordinator_address={address!r} must be host:port.")
  return host.strip("[]"), int(port)


def _read_line(conn: socket.socket, deadline: float) -> str:
  """One newline-terminated ASCII line; "" on EOF or when `deadline` passes."""
  data = b""
  while not data.endswith(b"\n"):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      return ""
    conn.settimeout(remaining)
    try:
      chunk = conn.recv(256)
    except (socket.timeout, OSError):
      return ""
    if not chunk:
      return ""
    data += chunk
  return data.decode("ascii", "replace").strip()


def rendezvous(coordinator_address: str, num_processes: int, process_id: int,
               timeout: float) -> None:
  """Returns once all `num_processes` processes are up; else raises.

  Process 0 listens on the coordinator's port; every other process connects
  (retrying until process 0 is up) and sends `JOIN <id> <num_processes>`.
  When all have joined, process 0 answers `GO` to each, waits for them to
  hang up (so that no socket of its side lingers on the port) and closes the
  port for `jax.distributed.initialize` to bind it. On a time-out process 0
  answers `MISSING <ids>` to those that came, and every process raises a
  RendezvousError naming the processes that never joined.
  """
  deadline = time.monotonic() + timeout
  host, port = _split_address(coordinator_address)
  hint = _HINT.format(n=num_processes)
  if process_id == 0:
    _coordinate(port, num_processes, timeout, deadline, hint)
    return
  conn = None
  while conn is None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      raise RendezvousError(
          f"Process {process_id} of {num_processes} timed out after "
          f"{timeout:g}s: the coordinator, process 0, never answered at "
          f"{coordinator_address} (it was not started, has crashed, or the "
          f"address is wrong). {hint}")
    try:
      conn = socket.create_connection((host, port), timeout=remaining)
    except OSError:  # refused: process 0 not listening (yet).
      time.sleep(min(_RETRY_S, max(0.0, deadline - time.monotonic())))
  with conn:
    conn.sendall(f"JOIN {process_id} {num_processes}\n".encode())
    reply = _read_line(conn, deadline + _REPLY_GRACE_S)
  if reply == "GO":
    return
  if reply.startswith("MISSING "):
    raise RendezvousError(
        f"Process {process_id} of {num_processes} timed out after "
        f"{timeout:g}s: process(es) {reply[len('MISSING '):]} never joined "
        f"the coordinator at {coordinator_address}. {hint}")
  if reply.startswith("ERROR "):
    raise RendezvousError(
        f"Process {process_id}: the coordinator at {coordinator_address} "
        f"refused it: {reply[len('ERROR '):]}. {hint}")
  raise RendezvousError(
      f"Process {process_id} of {num_processes} timed out after {timeout:g}s: "
      f"it reached {coordinator_address}, but the coordinator never "
      f"confirmed that all {num_processes} processes joined. {hint}")


def _coordinate(port: int, num_processes: int, timeout: float,
                deadline: float, hint: str) -> None:
  """Process 0's side of `rendezvous`."""
  if socket.has_dualstack_ipv6():
    server = socket.create_server(("", port), family=socket.AF_INET6,
                                  dualstack_ipv6=True)
  else:
    server = socket.create_server(("", port))
  joined: dict[int, socket.socket] = {}
  try:
    with server:
      while len(joined) < num_processes - 1:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          break
        server.settimeout(remaining)
        try:
          conn, _ = server.accept()
        except socket.timeout:
          break
        words = _read_line(conn, deadline).split()
        if (len(words) != 3 or words[0] != "JOIN"
            or not (words[1].isdigit() and words[2].isdigit())):
          conn.close()  # not one of ours (a port scanner, a stale job).
          continue
        pid, count = int(words[1]), int(words[2])
        problem = None
        if count != num_processes:
          problem = (f"it says --num_processes={count}, process 0 says "
                     f"{num_processes}")
        elif not 0 < pid < num_processes or pid in joined:
          problem = f"--process_id={pid} is out of range or already taken"
        if problem:
          conn.sendall(f"ERROR {problem}\n".encode())
          conn.close()
          raise RendezvousError(
              f"Process 0: a process joined with a wrong setting: {problem}. "
              f"{hint}")
        joined[pid] = conn
      missing = sorted(set(range(1, num_processes)) - set(joined))
      if missing:
        names = ", ".join(map(str, missing))
        for conn in joined.values():
          conn.sendall(f"MISSING {names}\n".encode())
        raise RendezvousError(
            f"Process 0 of {num_processes} (the coordinator, port {port}) "
            f"timed out after {timeout:g}s: process(es) {names} never "
            f"joined. {hint}")
      for conn in joined.values():
        conn.sendall(b"GO\n")
      for conn in joined.values():
        # EOF once the peer hung up; the peer's side keeps the TIME_WAIT.
        _read_line(conn, time.monotonic() + 5.0)
  finally:
    for conn in joined.values():
      conn.close()
  logging.info("All %d processes joined on port %d.", num_processes, port)


def initialize_from_flags() -> bool:
  return initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                    FLAGS.process_id, timeout=FLAGS.distributed_timeout,
                    force=FLAGS.distributed)
