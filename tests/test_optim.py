"""Tests for the LARS optimiser, its parameter groups and the lr schedule.

The reference is a plain-numpy transcription of solo-learn's torch LARS step
(float64), with its own hand-written schedule, group table and exclusion list,
so that it shares no code with `bayesncl_jax.optim`.
"""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bayesncl_jax import config_lib
from bayesncl_jax import optim

# (path, shape, group, excluded) -- the reference's own view of the tree.
LEAVES = (
    (("backbone", "conv", "kernel"), (3, 3, 2, 4), "main", False),
    (("backbone", "bn", "scale"), (4,), "main", True),
    (("backbone", "bn", "bias"), (4,), "main", True),
    (("projector", "dense", "kernel"), (4, 5), "main", False),
    (("projector", "dense", "bias"), (5,), "main", True),
    (("gate_head", "dense", "kernel"), (5, 3), "gate_head", False),
    (("gate_head", "dense", "bias"), (3,), "gate_head", True),
    (("classifier", "kernel"), (4, 3), "classifier", False),
    (("classifier", "bias"), (3,), "classifier", True),
)
ETA, EPS, MOMENTUM, WD = 0.02, 1e-8, 0.9, 1e-4


def _tree(arrays):
  """Nested dict from {path: array}."""
  out = {}
  for path, value in arrays.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return out


def _flat(tree):
  return {tuple(k.key for k in path): np.asarray(v, np.float64)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _random_leaves(rng, scale=1.0):
  return {path: scale * rng.standard_normal(shape)
          for path, shape, _, _ in LEAVES}


def _config(clip_lr=True, batch_size=128):
  c = config_lib.base_config()
  c.optim.batch_size = batch_size
  c.optim.base_lr = 0.4
  c.optim.classifier_lr = 0.1
  c.gate.lr = 0.1
  c.optim.weight_decay = WD
  c.optim.momentum = MOMENTUM
  c.optim.trust_coefficient = ETA
  c.optim.clip_lr = clip_lr
  c.optim.warmup_start_lr = 3e-5
  return c


def _hand_schedule(t, peak, total, warmup, start):
  if t < warmup:
    return start + (peak - start) * t / warmup
  if t >= total:
    return 0.0
  return peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


class TorchLars:
  """numpy transcription of solo-learn LARS.step() + SGD momentum."""

  def __init__(self, peaks, wds, total, warmup, start, clip_lr):
    self.peaks, self.wds = peaks, wds
    self.total, self.warmup, self.start = total, warmup, start
    self.clip_lr = clip_lr
    self.bufs = {}
    self.t = 0
    self.clip_bound = []  # per step: paths where min(r / lr, 1) picked 1.

  def step(self, params, grads):
    new, bound = {}, set()
    for path, _, group, excluded in LEAVES:
      p, g = params[path], grads[path]
      lr = _hand_schedule(self.t, self.peaks[group], self.total, self.warmup,
                          self.start)
      wd = self.wds[group]
      d = g
      if not excluded:
        p_norm, g_norm = np.linalg.norm(p), np.linalg.norm(g)
        if p_norm != 0 and g_norm != 0:
          lars_lr = ETA * p_norm / (g_norm + p_norm * wd + EPS)
          if self.clip_lr:
            if lars_lr / lr >= 1:
              bound.add(path)
            lars_lr = min(lars_lr / lr, 1)
          d = (g + wd * p) * lars_lr
      buf = self.bufs.get(path)
      buf = d.copy() if buf is None else MOMENTUM * buf + d
      self.bufs[path] = buf
      new[path] = p - lr * buf
    self.t += 1
    self.clip_bound.append(bound)
    return new


def _run_ours(config, params0, grads_seq, total, warmup):
  tx, _ = optim.make_optimizer(config, _tree(params0), total, warmup)
  params = jax.tree.map(jnp.float32, _tree(params0))
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  out = []
  for grads in grads_seq:
    params, state = step(params, state,
                         jax.tree.map(jnp.float32, _tree(grads)))
    out.append(_flat(params))
  return out


@pytest.mark.parametrize("clip_lr", [True, False])
def test_matches_torch_lars_over_steps(clip_lr):
  rng = np.random.default_rng(0)
  params0 = _random_leaves(rng)
  # Gradient scales chosen so that with clip_lr the clip binds on every
  # adapted leaf at step 0 (tiny g, large r) and on none at step 1 (huge g).
  scales = (1e-4, 1e2, 1.0, 1e-2, 1.0)
  grads_seq = [_random_leaves(rng, s) for s in scales]
  total, warmup = 6, 2
  batch = 128
  peaks = {"main": 0.4 * batch / 256, "gate_head": 0.1,
           "classifier": 0.1 * batch / 256}
  wds = {"main": WD, "gate_head": WD, "classifier": 0.0}
  ref = TorchLars(peaks, wds, total, warmup, 3e-5, clip_lr)
  ours = _run_ours(_config(clip_lr, batch), params0, grads_seq, total, warmup)

  params = params0
  for t, grads in enumerate(grads_seq):
    params = ref.step(params, grads)
    for path in params:
      np.testing.assert_allclose(ours[t][path], params[path], rtol=2e-5,
                                 atol=1e-7, err_msg=f"step {t} {path}")
  if clip_lr:
    adapted = {path for path, _, _, excluded in LEAVES if not excluded}
    assert ref.clip_bound[0] == adapted  # clip binds everywhere.
    assert not ref.clip_bound[1]  # clip binds nowhere.


def test_zero_norm_leaves_follow_torch():
  """Zero grad or zero param on an adapted leaf: d = g, no weight decay."""
  rng = np.random.default_rng(1)
  params0 = _random_leaves(rng)
  params0[("projector", "dense", "kernel")] = np.zeros((4, 5))
  grads = _random_leaves(rng)
  grads[("backbone", "conv", "kernel")] = np.zeros((3, 3, 2, 4))
  (ours,) = _run_ours(_config(), params0, [grads], 10, 0)
  # ||g|| = 0: torch leaves the weights untouched (optax.lars would decay).
  np.testing.assert_array_equal(
      ours[("backbone", "conv", "kernel")],
      np.float32(params0[("backbone", "conv", "kernel")]))
  # ||p|| = 0: plain SGD step with the group's lr at step 0.
  lr0 = 0.4 * 128 / 256
  np.testing.assert_allclose(ours[("projector", "dense", "kernel")],
                             -lr0 * grads[("projector", "dense", "kernel")],
                             rtol=1e-6)


def _single_group(tx_ours, tx_ref, params, grads_fn, steps):
  s_ours, s_ref = tx_ours.init(params), tx_ref.init(params)
  p_ours = p_ref = params
  for t in range(steps):
    g_ours, g_ref = grads_fn(t, p_ours), grads_fn(t, p_ref)
    u, s_ours = tx_ours.update(g_ours, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = tx_ref.update(g_ref, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  return p_ours, p_ref


def _trees_close(a, b):
  return all(np.allclose(x, y, rtol=1e-5, atol=1e-8)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_agrees_with_optax_lars_where_formulas_coincide():
  """optax.lars: buf = m * buf + lr * (g + wd p) * eta ||p|| / ||g + wd p||.

  Ours (torch): buf = m * buf + (g + wd p) * eta ||p|| / (||g|| + wd ||p||),
  update = -lr * buf. They coincide (clip off) when (i) lr is constant, so
  lr factors out of the momentum sum, and (ii) wd = 0 or g is a positive
  multiple of p, so ||g + wd p|| = ||g|| + wd ||p||. Otherwise they differ.
  """
  rng = np.random.default_rng(2)
  params = jax.tree.map(jnp.float32, _tree(_random_leaves(rng)))
  grad_seq = [jax.tree.map(jnp.float32, _tree(_random_leaves(rng)))
              for _ in range(4)]
  random_grads = lambda t, p: grad_seq[t]
  parallel_grads = lambda t, p: jax.tree.map(lambda x: (0.5 + t) * x, p)
  mask = optim.lars_mask(params)

  def both(lr, wd):
    ours = optim.lars(lr, wd, MOMENTUM, ETA, EPS, clip_lr=False, mask=mask)
    ref = optax.lars(lr, weight_decay=wd, weight_decay_mask=mask,
                     trust_coefficient=ETA, eps=EPS, trust_ratio_mask=mask,
                     momentum=MOMENTUM)
    return ours, ref

  # Agreement: constant lr with wd = 0, or with g parallel to p.
  assert _trees_close(*_single_group(*both(0.3, 0.0), params, random_grads, 4))
  assert _trees_close(*_single_group(*both(0.3, 0.1), params, parallel_grads,
                                     4))
  # Disagreement: generic g with wd > 0 (different trust-ratio denominator).
  assert not _trees_close(*_single_group(*both(0.3, 0.1), params,
                                         random_grads, 1))
  # Disagreement: a changing lr with wd = 0 (momentum before vs after lr);
  # the first step agrees, since the buffer is still empty.
  sched = lambda t: 0.3 / (1.0 + t)
  assert _trees_close(*_single_group(*both(sched, 0.0), params, random_grads,
                                     1))
  assert not _trees_close(*_single_group(*both(sched, 0.0), params,
                                         random_grads, 3))


def test_schedule_endpoints_and_hand_formula():
  peak, start, warmup, total = 0.4, 3e-5, 10, 110
  s = optim.learning_rate_schedule(peak, total, warmup, start)
  np.testing.assert_allclose(s(0), start, rtol=1e-6)
  np.testing.assert_allclose(s(warmup), peak, rtol=1e-6)
  np.testing.assert_allclose(s((warmup + total) // 2), peak / 2, rtol=1e-5)
  assert float(s(total)) == pytest.approx(0.0, abs=1e-9)
  assert float(s(total + 5)) == pytest.approx(0.0, abs=1e-9)
  steps = np.arange(total + 1)
  want = [_hand_schedule(t, peak, total, warmup, start) for t in steps]
  np.testing.assert_allclose(jax.vmap(s)(steps), want, rtol=1e-5, atol=1e-8)


def test_schedule_edge_cases():
  no_warmup = optim.learning_rate_schedule(0.4, 20, 0, 3e-5)
  np.testing.assert_allclose(no_warmup(0), 0.4, rtol=1e-6)
  all_warmup = optim.learning_rate_schedule(0.4, 8, 8, 0.0)
  np.testing.assert_allclose(all_warmup(4), 0.2, rtol=1e-6)
  assert float(all_warmup(8)) == 0.0
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.learning_rate_schedule(0.4, 8, 9, 0.0)


@pytest.mark.parametrize(
    "n, batch, epochs, total_override, warmup_epochs, expected",
    [
        (50000, 256, 200, -1, 10, (39000, 1950, 195)),  # CIFAR, drop 80.
        (50000, 256, 200, 100, 10, (100, 5, 195)),  # keeps 10/200 = 5%.
        (1000, 100, 3, 7, 1, (7, 2, 10)),  # 7 / 3 = 2.33 -> 2.
        (1000, 100, 4, 6, 1, (6, 2, 10)),  # 1.5 rounds half up -> 2.
        (1000, 100, 0, 50, 10, (50, 0, 10)),  # epochs 0: no warmup.
        (1000, 100, 2, -1, 10, (20, 20, 10)),  # warmup capped at total.
    ])
def test_num_train_steps(n, batch, epochs, total_override, warmup_epochs,
                         expected):
  c = config_lib.base_config()
  c.optim.batch_size = batch
  c.optim.epochs = epochs
  c.optim.total_steps = total_override
  c.optim.warmup_epochs = warmup_epochs
  assert optim.num_train_steps(c, n) == expected


def test_num_train_steps_rejects_less_than_one_batch():
  c = config_lib.base_config()
  with pytest.raises(ValueError, match="batch_size=256"):
    optim.num_train_steps(c, 255)


def test_excluded_leaves_are_plain_momentum_sgd():
  """bias / scale: same updates as optax.sgd (no wd, no trust ratio)."""
  rng = np.random.default_rng(3)
  params0 = _random_leaves(rng)
  grads_seq = [_random_leaves(rng) for _ in range(3)]
  total, warmup = 10, 2
  config = _config()
  ours = _run_ours(config, params0, grads_seq, total, warmup)
  _, schedules = optim.make_optimizer(config, _tree(params0), total, warmup)
  for path, _, group, excluded in LEAVES:
    if not excluded:
      continue
    sgd = optax.sgd(schedules[group], momentum=MOMENTUM)
    p = jnp.float32(params0[path])
    state = sgd.init(p)
    for t, grads in enumerate(grads_seq):
      u, state = sgd.update(jnp.float32(grads[path]), state, p)
      p = optax.apply_updates(p, u)
      np.testing.assert_allclose(ours[t][path], p, rtol=1e-6, atol=1e-8,
                                 err_msg=str(path))


def test_groups_schedules_and_labels():
  config = _config(batch_size=512)
  params = _tree({path: np.zeros(shape, np.float32)
                  for path, shape, _, _ in LEAVES})
  _, schedules = optim.make_optimizer(config, params, 100, 0)
  peaks = {k: float(v(0)) for k, v in schedules.items()}
  assert peaks == pytest.approx(
      {"main": 0.8, "gate_head": 0.1, "classifier": 0.2})
  # NCL / SimCLR: no gate head, no gate_head group.
  del params["gate_head"]
  tx, schedules = optim.make_optimizer(config, params, 100, 0)
  assert set(schedules) == {"main", "classifier"}
  updates, _ = tx.update(params, tx.init(params), params)
  chex.assert_trees_all_equal_shapes(updates, params)
  with pytest.raises(ValueError, match="'decoder'"):
    optim.make_optimizer(config, {**params, "decoder": {"kernel": 1.0}}, 10, 0)


def test_lars_mask_excludes_bias_scale_and_vectors():
  params = {"attn": {"kernel": jnp.zeros((2, 3, 4)), "bias": jnp.zeros((3, 4)),
                     "scale": jnp.zeros((4, 4))},
            "vec": {"w": jnp.zeros((5,))}, "temp": jnp.zeros(())}
  assert optim.lars_mask(params) == {
      "attn": {"kernel": True, "bias": False, "scale": False},
      "vec": {"w": False}, "temp": False}
