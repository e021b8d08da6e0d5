"""8 simulated CPU devices vs 1: same loss, gradients and BatchNorm stats."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bayesncl_jax import losses
from bayesncl_jax import models
from bayesncl_jax import sharding


@pytest.fixture(scope="module")
def meshes():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  return sharding.make_mesh(jax.devices()[:1]), sharding.make_mesh(
      jax.devices()[:8])


def _setup(method):
  model = models.ContrastiveModel(
      method=method, num_classes=5, width=4, stage_sizes=(1, 1),
      proj_hidden=16, proj_out=8, non_neg="rep_relu",
      gate_type="gumbel_sigmoid")
  n = 16  # images; 32 rows after the two views
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  views = jax.random.uniform(k1, (2 * n, 8, 8, 3))
  labels = jax.random.randint(k2, (n,), 0, 5)
  variables = model.init(k3, views[:2], train=False)
  return model, variables, views, labels


def _forward_backward(model, mesh, variables, views, labels, rng):
  """One full forward/backward of encoder + heads + total loss."""
  def loss_fn(params):
    out, new_state = model.apply(
        {"params": params, "batch_stats": variables["batch_stats"]}, views,
        train=True, gate_rng=rng, mutable=["batch_stats"])
    loss, metrics = losses.total_loss(
        out, labels, method=model.method, temperature=0.2, kl_weight=3e-5,
        prior_prob=0.8, row_sharding=sharding.rows_sharding(mesh))
    return loss, (metrics, new_state["batch_stats"])
  (loss, (metrics, stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(variables["params"])
  return loss, metrics, stats, grads


@pytest.mark.parametrize("method", ["cl", "bayesncl"])
def test_eight_devices_equal_one_device(meshes, method):
  model, variables, views, labels = _setup(method)
  results = []
  for mesh in meshes:
    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    @chex.assert_max_traces(n=1)
    def fwd_bwd(variables, views, labels, rng, mesh=mesh):
      return _forward_backward(model, mesh, variables, views, labels, rng)
    step = jax.jit(fwd_bwd, in_shardings=(rep, data, data, rep),
                   out_shardings=rep)
    args = (jax.device_put(variables, rep), jax.device_put(views, data),
            jax.device_put(labels, data), jax.random.key(7))
    results.append(step(*args))
    # A second call with new values must not recompile.
    step(args[0], args[1] * 0.5, args[2], jax.random.key(8))
    chex.clear_trace_counter()
  (l1, m1, s1, g1), (l8, m8, s8, g8) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  chex.assert_trees_all_close(m1, m8, rtol=1e-5, atol=1e-6)
  # BatchNorm running statistics: those of the global batch on both.
  chex.assert_trees_all_close(s1, s8, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(g1, g8, rtol=1e-4, atol=1e-6)


def test_batchnorm_statistics_are_global_batch_statistics(meshes):
  # Rows on different devices have very different means; the running mean
  # update must use the mean over all rows, not a per-device one.
  _, mesh8 = meshes
  bn = models.nn.BatchNorm(use_running_average=False, momentum=0.0)
  x = jnp.repeat(jnp.arange(8.0), 4)[:, None] * jnp.ones((1, 3))
  variables = bn.init(jax.random.key(0), x)
  data = sharding.batch_sharding(mesh8)
  _, state = jax.jit(lambda v, x: bn.apply(v, x, mutable=["batch_stats"]),
                     in_shardings=(sharding.replicated(mesh8), data))(
                         variables, jax.device_put(x, data))
  np.testing.assert_allclose(state["batch_stats"]["mean"], [3.5] * 3)
  np.testing.assert_allclose(state["batch_stats"]["var"],
                             [np.var(np.arange(8.0))] * 3, rtol=1e-6)


def _compiled_loss(mesh, n_rows, dim):
  z = jax.ShapeDtypeStruct((n_rows, dim), jnp.float32,
                           sharding=sharding.batch_sharding(mesh))
  fn = jax.jit(jax.value_and_grad(functools.partial(
      losses.nt_xent_loss, temperature=0.2,
      row_sharding=sharding.rows_sharding(mesh))))
  return fn.lower(z).compile()


def test_similarity_memory_scales_with_local_rows(meshes):
  mesh1, mesh8 = meshes
  n_rows, dim = 2048, 16
  full_bytes = n_rows * n_rows * 4  # the whole (2N)^2 float32 matrix: 16 MiB
  c1, c8 = _compiled_loss(mesh1, n_rows, dim), _compiled_loss(
      mesh8, n_rows, dim)
  t1 = c1.memory_analysis().temp_size_in_bytes
  t8 = c8.memory_analysis().temp_size_in_bytes
  print(f"per-device temp bytes: 1 device {t1}, 8 devices {t8}; "
        f"full matrix {full_bytes}")
  assert t1 >= full_bytes  # one device must hold the whole matrix...
  assert t8 < full_bytes / 2  # ...8 devices only their rows (~1/8 of it).
  hlo = c8.as_text()
  assert f"f32[{n_rows},{n_rows}]" not in hlo
  assert f"f32[{n_rows // 8},{n_rows}]" in hlo
