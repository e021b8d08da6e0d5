"""When and how a process joins a multi-process run (no real TPU needed).

`distributed.plan` is a pure decision over the flags, the environment, a
TPU-VM check and a host count; the TPU-VM check reads a fake PCI tree and
the host count a fake environment or metadata answer.
"""
import pytest

from bayesncl_jax import distributed


def _never(*_):
  raise AssertionError("must not be asked")


def _pci(root, devices):
  """A fake /sys/bus/pci/devices with (vendor, device) entries."""
  for i, (vendor, device) in enumerate(devices):
    d = root / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(root)


def test_on_tpu_vm_reads_the_pci_bus(tmp_path):
  nvidia_gpu = ("0x10de", "0x2330")
  assert not distributed.on_tpu_vm(_pci(tmp_path / "gpu", [nvidia_gpu]))
  assert distributed.on_tpu_vm(_pci(tmp_path / "v4", [nvidia_gpu,
                                                      ("0x1ae0", "0x005e")]))
  assert distributed.on_tpu_vm(_pci(tmp_path / "v5e", [("0x1ae0", "0x0063")]))
  # A Google device that is not a TPU chip (e.g. a gVNIC).
  assert not distributed.on_tpu_vm(_pci(tmp_path / "nic", [("0x1ae0",
                                                            "0x0042")]))
  assert not distributed.on_tpu_vm(str(tmp_path / "missing"))


def test_tpu_pci_ids_match_jaxs_own_table():
  # distributed.py keeps a copy of JAX's private table (jax._src is not an
  # API); a JAX upgrade that adds a TPU generation must show up here.
  # pylint: disable-next=g-import-not-at-top
  from jax._src import hardware_utils
  assert distributed._GOOGLE_PCI_VENDOR == (
      hardware_utils._GOOGLE_PCI_VENDOR_ID)
  assert set(distributed._TPU_PCI_DEVICES) == set(
      hardware_utils._TPU_PCI_DEVICE_IDS)


def test_tpu_host_count_from_gke_env_or_gce_metadata():
  assert distributed.tpu_host_count(
      {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, metadata=_never) == 4
  assert distributed.tpu_host_count(
      {"TPU_PROCESS_ADDRESSES": "a:1,b:1", "TPU_WORKER_HOSTNAMES": "a"},
      metadata=_never) == 2
  # gcloud-created TPU VMs: no such variables, the metadata server knows.
  endpoints = "uid0:0:10.0.0.2,uid1:1:10.0.0.3"
  assert distributed.tpu_host_count({}, metadata=lambda: endpoints) == 2
  assert distributed.tpu_host_count({}, metadata=lambda: "uid:0:10.0.0.2") == 1
  assert distributed.tpu_host_count({}, metadata=lambda: None) == 1


@pytest.mark.parametrize("hosts, expected", [(1, "none"), (4, "auto")])
def test_gce_tpu_vm_initialises_only_with_several_hosts(hosts, expected):
  assert distributed.plan(env={}, tpu_vm=lambda: True,
                          tpu_hosts=lambda: hosts) == expected


def test_no_tpu_no_settings_is_one_process():
  assert distributed.plan(env={}, tpu_vm=lambda: False,
                          tpu_hosts=_never) == "none"


def test_explicit_settings_win_over_tpu_detection():
  # GPU hosts / SLURM: flags or the JAX_* variables; TPU never probed.
  assert distributed.plan("10.0.0.1:1234", 2, 0, env={}, tpu_vm=_never,
                          tpu_hosts=_never) == "explicit"
  env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert distributed.plan(env=env, tpu_vm=_never,
                          tpu_hosts=_never) == "explicit"


def test_force_flag():
  assert distributed.plan(force=True, env={}, tpu_vm=_never,
                          tpu_hosts=_never) == "auto"
  assert distributed.plan("h:1", 2, 0, force=False, env={}, tpu_vm=_never,
                          tpu_hosts=_never) == "none"
  assert distributed.plan(force=False, env={}, tpu_vm=lambda: True,
                          tpu_hosts=lambda: 8) == "none"


def test_initialize_auto_calls_jax_without_arguments(monkeypatch):
  calls = []
  monkeypatch.setattr(distributed, "plan", lambda *a, **k: "auto")
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda *a, **k: calls.append((a, k)))
  assert distributed.initialize(timeout=12) is True
  assert calls == [((), {"initialization_timeout": 12})]


def test_initialize_auto_failure_names_the_fix(monkeypatch):
  def fail(*_, **__):
    raise ValueError("coordinator unreachable")
  monkeypatch.setattr(distributed, "plan", lambda *a, **k: "auto")
  monkeypatch.setattr(distributed.jax.distributed, "initialize", fail)
  with pytest.raises(RuntimeError, match="--worker=all"):
    distributed.initialize(timeout=1)


def test_initialize_explicit_needs_all_three(monkeypatch):
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
              "JAX_PROCESS_ID"):
    monkeypatch.delenv(key, raising=False)
  with pytest.raises(ValueError, match="need all of --coordinator_address"):
    distributed.initialize("h:1", 2, None)
  with pytest.raises(ValueError, match=r"--process_id=2 must be in \[0, 2\)"):
    distributed.initialize("h:1", 2, 2)
