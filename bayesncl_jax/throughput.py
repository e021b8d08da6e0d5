"""Run-time tools of big jobs: step-time split, MFU, profiler capture.

Every log interval `train` writes, beside `images_per_sec`:

* `step_ms`: wall time per step over the interval;
* `input_ms`: of it, the time the host waited for the next batch (the input
  pipeline's `next` and the global-batch assembly); `compute_ms` = the rest
  (dispatch, the device's work, which the host waits for when it fetches
  the metrics). An input-bound run has `input_ms` close to `step_ms`.
* `mfu`: model FLOPs utilisation, `flops_per_step / (step_ms / 1000) /
  peak`, per device: XLA's cost analysis of the compiled (partitioned)
  step gives the FLOPs one device runs per step; `peak` is the device's
  dense bf16 peak from `PEAK_TFLOPS` (or `config.peak_tflops`). Absent when
  the peak is unknown (CPUs, other accelerators, unless the config gives it).

`config.profile_steps="START:END"` captures a `jax.profiler` trace of steps
START..END-1 into the workdir's TensorBoard folder (TensorBoard's profile
plugin shows it); a folder that cannot be written is one warning, training
goes on.
"""
from __future__ import annotations

import os

from absl import logging
from etils import epath
import jax

from bayesncl_jax import config_lib

# Dense bf16 peak TFLOP/s per chip (TPU) or per GPU (SXM), from the vendors'
# product pages: Cloud TPU system architecture (v4 275, v5e 197, v5p 459,
# v6e 918) and NVIDIA's A100 (312), H100 SXM (989) and H200 (989, the same
# compute as H100 SXM) datasheets. Matched against `device.device_kind`
# (lower case) in this order; the first match wins.
PEAK_TFLOPS = (
    (("v6 lite", "v6e"), 918.0),
    (("v5p",), 459.0),
    (("v5 lite", "v5e", "v5litepod"), 197.0),
    (("tpu v4",), 275.0),
    (("h200",), 989.0),
    (("h100",), 989.0),
    (("a100",), 312.0),
)


def peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
  """The per-device peak in TFLOP/s: `override` if > 0, else the table's."""
  if override and override > 0:
    return float(override)
  kind = device_kind.lower()
  for names, peak in PEAK_TFLOPS:
    if any(name in kind for name in names):
      return peak
  return None


def compiled_flops(compiled) -> float | None:
  """FLOPs per call of one device's program, from XLA's cost analysis."""
  try:
    analysis = compiled.cost_analysis()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("No FLOP count for the step (%s): MFU is not logged.", e)
    return None
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def mfu(flops_per_step: float | None, step_seconds: float,
        peak: float | None) -> float | None:
  """flops_per_step / step_seconds / (peak TFLOP/s * 1e12), or None."""
  if not flops_per_step or not peak or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (peak * 1e12)


class Profiler:
  """Traces the steps START..END-1 of `profile_steps` into `logdir`.

  Call `before_step(step)` before each step and `after_step(step, tree)`
  after it (tree: something of the step's output, waited for before the
  trace stops). Any failure (an unwritable folder, a trace already running)
  is logged once as a warning and the profiler turns itself off.
  """

  def __init__(self, spec: str, logdir: str):
    self.window = config_lib.parse_profile_steps(spec)
    self.logdir = os.fspath(logdir)
    self.active = False
    self.written = False

  def _fail(self, what: str, e: BaseException):
    logging.warning("Profiler: could not %s a trace in %s (%s: %s); training "
                    "goes on without it.", what, self.logdir,
                    type(e).__name__, e)
    self.window = None
    self.active = False

  def before_step(self, step: int):
    if self.window is None or self.active or step != self.window[0]:
      return
    try:
      # Fails here, before a trace starts, when the folder is not writable
      # (a failed export would leave JAX's trace session open).
      epath.Path(self.logdir).mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info("Profiler: tracing steps %d..%d into %s", *self.window,
                   self.logdir)
    except Exception as e:  # pylint: disable=broad-except
      self._fail("start", e)

  def after_step(self, step: int, tree=None, *, last: bool = False):
    if not self.active or (step + 1 < self.window[1] and not last):
      return
    try:
      if tree is not None:
        jax.block_until_ready(tree)
      self.active = False
      jax.profiler.stop_trace()
      self.written = True
      self.window = None
    except Exception as e:  # pylint: disable=broad-except
      self._fail("write", e)
      # JAX keeps a session whose export failed open; close it so that a
      # later start_trace (another run in this process) works.
      state = getattr(getattr(jax, "_src").profiler, "_profile_state", None)
      if state is not None and hasattr(state, "reset"):
        state.reset()

  def close(self):
    """Stops a trace still running (the run ended inside the window)."""
    if self.active:
      self.after_step(0, last=True)
