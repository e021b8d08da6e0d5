r"""Where the time of one pre-training step goes (issue 24, item 1).

Times, on the model of a config file (default configs/fashion_mnist.py: width
8, stages 1,1,1, 28 px, batch 256, one channel), the jitted pieces of
`train.make_train_step`, each compiled on its own and timed interleaved with
the others (the machine is shared: one configuration after the other would
compare loads, not programs):

  step        the whole train step (augmentation + update), as training runs it
  augment     `views_of_batch` + `augment_batch` of both views, nothing else
  update      forward, loss, backward, optimiser: the step minus augmentation
  fwd_bwd     forward, loss, backward (no optimiser)
  forward     forward and loss only
  optimizer   `tx.update` + `apply_updates` on given gradients (LARS)
  loss        NT-Xent + online CE (+ KL) and its gradient on given outputs
  update_nobn `update` with every BatchNorm replaced by the identity (timing
              only: what normalisation layers cost)

Per piece: median ms over --steps calls, XLA's FLOPs and bytes, and the
compile time. Prints one `JSON {...}` record per piece and a readable table.

  python bench/step_profile.py                     # configs/fashion_mnist.py
  python bench/step_profile.py --pieces=step,augment --steps=10
  python bench/step_profile.py --config=configs/fashion_mnist.py:method=ncl

No dataset is read: random uint8 views of the config's shape.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from unittest import mock

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(1, os.path.dirname(_HERE))

import common  # noqa: E402  pylint: disable=g-import-not-at-top

PIECES = ("step", "augment", "update", "fwd_bwd", "forward", "optimizer",
          "loss", "update_nobn")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/fashion_mnist.py")
  p.add_argument("--pieces", default=",".join(PIECES))
  p.add_argument("--steps", type=int, default=5,
                 help="Timed rounds; each round calls every piece once.")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--batch_size", type=int, default=0, help="0: the config's.")
  p.add_argument("--channels", type=int, default=0, choices=(0, 1, 3),
                 help="0: the config's; 3: RGB views with CIFAR-10's "
                      "statistics (the shape bench/step_throughput.py times)")
  return p.parse_args(argv)


def _identity_batchnorm():
  """A stand-in for flax's BatchNorm that returns its input (timing only)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Identity(nn.Module):
    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: object = None
    scale_init: object = None
    use_scale: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, use_running_average=None):
      return x
  return Identity


def build_pieces(config, names):
  """{name: (jitted fn, args)} for the requested pieces."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import augment, losses, models, sharding, train  # pylint: disable=g-import-not-at-top

  setup, state, batch, rng, mesh = common.synthetic_train_inputs(config)
  s, c = config.dataset.image_size, len(config.dataset.mean)
  mean, std = tuple(config.dataset.mean), tuple(config.dataset.std)
  dtype = train.compute_dtype(config)

  def aug(batch, rng):
    r1, r2, _ = jax.random.split(rng, 3)
    v1, v2 = augment.views_of_batch(batch, s)
    return (augment.augment_batch(r1, v1, config.aug, mean, std, dtype),
            augment.augment_batch(r2, v2, config.aug, mean, std, dtype))

  aug_jit = jax.jit(aug)
  view1, view2 = aug_jit(batch, rng)
  labels = batch["label"]
  update = train.make_update_fn(config, setup.model, setup.tx,
                                sharding.rows_sharding(mesh))

  def loss_of(model):
    def fn(params, batch_stats, v1, v2, labels, gate_rng):
      out, _ = train.forward_views(model, params, batch_stats, v1, v2,
                                   bn_views=config.model.bn_views,
                                   gate_rng=gate_rng)
      loss, _ = losses.total_loss(
          out, labels, method=config.method,
          temperature=config.loss.temperature,
          kl_weight=config.gate.kl_weight, prior_prob=config.gate.prior_prob)
      return loss
    return fn

  pieces = {}
  if "step" in names:
    # The step donates its state: give it a copy of its own.
    pieces["step"] = (train.make_train_step(setup),
                      (jax.tree.map(jnp.copy, state), batch, rng), True)
  if "augment" in names:
    pieces["augment"] = (aug_jit, (batch, rng), False)
  if "update" in names:
    pieces["update"] = (jax.jit(lambda st, a, b_, l, r: update(st, a, b_, l,
                                                                r)[:2]),
                        (state, view1, view2, labels, rng), False)
  fwd = loss_of(setup.model)
  if "fwd_bwd" in names:
    pieces["fwd_bwd"] = (jax.jit(jax.grad(fwd)),
                         (state.params, state.batch_stats, view1, view2,
                          labels, rng), False)
  if "forward" in names:
    pieces["forward"] = (jax.jit(fwd), (state.params, state.batch_stats,
                                        view1, view2, labels, rng), False)
  if "optimizer" in names:
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), state.params)

    def opt(params, opt_state, grads):
      updates, opt_state = setup.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    pieces["optimizer"] = (jax.jit(opt), (state.params, state.opt_state,
                                          grads), False)
  if "loss" in names:
    out, _ = jax.jit(lambda p, bs, a, b_, r: train.forward_views(
        setup.model, p, bs, a, b_, bn_views=config.model.bn_views,
        gate_rng=r))(state.params, state.batch_stats, view1, view2, rng)

    def loss_only(out, labels):
      return losses.total_loss(
          out, labels, method=config.method,
          temperature=config.loss.temperature,
          kl_weight=config.gate.kl_weight,
          prior_prob=config.gate.prior_prob)[0]
    grad_keys = ("z", "logits") + (("gate_probs",) if "gate_probs" in out
                                   else ())

    def loss_grad(out, labels):
      return jax.grad(lambda sub: loss_only({**out, **sub}, labels))(
          {k: out[k] for k in grad_keys})
    pieces["loss"] = (jax.jit(loss_grad), (out, labels), False)
  if "update_nobn" in names:
    with mock.patch.object(models.nn, "BatchNorm", _identity_batchnorm()):
      model = models.model_from_config(config)
      variables = jax.jit(lambda r: model.init(
          r, jnp.zeros((2, s, s, c)), train=False))(jax.random.key(0))
    params = variables["params"]
    fn = loss_of(model)

    def update_nobn(params, v1, v2, labels, r):
      # Traced (at lower time) with the stand-in in place, as at init.
      with mock.patch.object(models.nn, "BatchNorm", _identity_batchnorm()):
        grads = jax.grad(fn)(params, {}, v1, v2, labels, r)
      return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads)
    pieces["update_nobn"] = (jax.jit(update_nobn),
                             (params, view1, view2, labels, rng), False)
  return pieces


def main(argv=None):
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from bayesncl_jax import config_lib  # pylint: disable=g-import-not-at-top
  path, _, arg = args.config.partition(":")
  config = config_lib.load_file(path, arg or None)
  if args.batch_size:
    config.optim.batch_size = args.batch_size
  if args.channels == 3:
    config.dataset.mean = (0.4914, 0.4822, 0.4465)
    config.dataset.std = (0.2470, 0.2435, 0.2616)
  names = [n for n in args.pieces.split(",") if n]
  unknown = sorted(set(names) - set(PIECES))
  if unknown:
    sys.exit(f"Unknown --pieces {unknown}: choose from {', '.join(PIECES)}")
  pieces = build_pieces(config, names)

  compiled, compile_s = {}, {}
  for name, (fn, fargs, _) in pieces.items():
    t0 = time.perf_counter()
    compiled[name] = fn.lower(*fargs).compile()
    compile_s[name] = time.perf_counter() - t0

  times = {name: [] for name in pieces}
  holder = {name: fargs for name, (_, fargs, _) in pieces.items()}
  for i in range(args.warmup + args.steps):
    for name, (_, _, donates) in pieces.items():
      t0 = time.perf_counter()
      out = compiled[name](*holder[name])
      jax.block_until_ready(out)
      dt = time.perf_counter() - t0
      if donates:  # the train step donates its state: feed the new one.
        holder[name] = (out[0],) + tuple(holder[name][1:])
      if i >= args.warmup:
        times[name].append(dt * 1e3)

  import statistics  # pylint: disable=g-import-not-at-top
  cpu = time.process_time()
  rows = []
  for name in pieces:
    cost = common.xla_cost(compiled[name])
    r = {"piece": name, "config": args.config,
         "batch_size": config.optim.batch_size,
         "median_ms": statistics.median(times[name]),
         "min_ms": min(times[name]), "times_ms": times[name],
         "compile_s": compile_s[name], "flops": cost["flops"],
         "bytes_accessed": cost["bytes_accessed"], "process_cpu_s": cpu}
    rows.append(r)
    flops = cost["flops"]
    common.emit(r, f"{name:12s} {r['median_ms']:9.1f} ms (min "
                f"{r['min_ms']:.1f})  compile {compile_s[name]:5.1f} s  "
                + (f"{flops / 1e9:.2f} GFLOP" if flops else "n/a"))


if __name__ == "__main__":
  main()
