"""Train a Flax linen model with the library's transforms in an optax chain.

    python examples/train_linen.py                                   # digits, CNN+BN
    python examples/train_linen.py --optimizer gnp_orthogonal_sgd --steps 500
    python examples/train_linen.py --dataset cifar10 --steps 64000 --batch-size 128 \\
        --lr 0.01 --weight-decay 1e-4 --cosine --checkpoint-dir ckpt/resnet20

A `flax.training.train_state.TrainState` with BatchNorm statistics. The loss
returns the new statistics (and the logits) as auxiliary output, so:
- the training step keeps the statistics of the forward pass at the current
  parameters;
- `gradient_norm_penalty(has_aux=True)` discards those of its perturbed pass,
  which the parameters never take.

`--checkpoint-dir` saves params, BatchNorm statistics, optimizer state and the
step with orbax, and a rerun resumes from the latest checkpoint: the batch of
step i depends only on (seed, i), so the resumed run takes exactly the steps
the uninterrupted run would have taken.

Learning rates default per optimizer (examples/defaults.py: orthogonal_sgd
0.005, a tenth of plain SGD's 0.05); on CIFAR-10 above, 0.01 is a tenth of
plain SGD's 0.1 for ResNet-20.
"""

from __future__ import annotations

import os

# One OpenBLAS thread, set before numpy and jax load it: jaxlib's CPU LAPACK
# kernels call scipy's OpenBLAS, whose spinning thread pool fights XLA's
# threads (SVDs 10-200x slower on a busy CPU; docs/getting_started.md).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import models  # noqa: E402
import train_common as common  # noqa: E402


class TrainState(train_state.TrainState):
  batch_stats: Any


def create_state(args, ds: data.Dataset) -> TrainState:
  model = models.LINEN[args.model](common.num_outputs(ds))
  x0 = ds.normalize(ds.x_train[:1])
  variables = model.init(jax.random.key(args.seed), x0, train=False)
  tx = common.make_optimizer(args, gnp_has_aux=True)
  state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                            tx=tx, batch_stats=variables.get("batch_stats", {}))
  # An array, not the Python int 0: the first step must not compile twice.
  return state.replace(step=jnp.zeros([], jnp.int32))


def make_train_step(args, ds: data.Dataset):
  loss_of = common.task_loss(ds)
  with_grad_fn = common.needs_grad_fn(args)

  def loss_fn(params, batch_stats, apply_fn, x, y):
    out, mutated = apply_fn({"params": params, "batch_stats": batch_stats}, x,
                            train=True, mutable=["batch_stats"])
    # Aux: the statistics of this pass, and the outputs (for methods that
    # need the logits).
    return loss_of(out, y), (mutated.get("batch_stats", {}), out)

  @jax.jit
  def train_step(state: TrainState, x, y):
    grad = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (batch_stats, _)), grads = grad(
        state.params, state.batch_stats, state.apply_fn, x, y)
    extra = {}
    if with_grad_fn:
      # Same batch, same running statistics; returns (grads, aux) and the
      # transform drops aux, so the perturbed pass never touches batch_stats.
      extra["grad_fn"] = jax.grad(
          lambda p: loss_fn(p, state.batch_stats, state.apply_fn, x, y),
          has_aux=True)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params,
                                         **extra)
    state = state.replace(step=state.step + 1,
                          params=optax.apply_updates(state.params, updates),
                          opt_state=opt_state, batch_stats=batch_stats)
    return state, loss

  return train_step


@jax.jit
def predict(state: TrainState, x):
  return state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                        x, train=False)


def evaluate(state: TrainState, ds: data.Dataset, batch_size: int = 1000):
  outs = [predict(state, ds.normalize(ds.x_test[i:i + batch_size]))
          for i in range(0, len(ds.x_test), batch_size)]
  return common.metric(ds, np.concatenate(outs), ds.y_test)


def checkpoint_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params,
          "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def main(argv=None) -> dict:
  args = common.parse(common.parser(__doc__.split("\n\n")[0]), argv)
  ds = common.load_data(args)
  print(f"{args.dataset} {args.model}: {common.describe(args)}")
  state = create_state(args, ds)
  manager = common.checkpoint_manager(args)
  restored = common.restore_latest(manager, checkpoint_tree(state))
  if restored is not None:
    state = state.replace(**restored)
  train_step = make_train_step(args, ds)

  history = {"step": [], "train_loss": [], common.metric_name(ds): []}
  start = int(state.step)
  with tqdm(total=args.steps, initial=min(start, args.steps), unit="step",
            desc=f"{args.model} {args.optimizer}", disable=None) as progress:
    for i in range(start, args.steps):
      x, y = data.batch(ds, args.batch_size, args.seed, i, args.augment)
      state, loss = train_step(state, x, y)
      step = i + 1
      if step % args.eval_every == 0 or step == args.steps:
        history["step"].append(step)
        history["train_loss"].append(float(loss))
        history[common.metric_name(ds)].append(evaluate(state, ds))
        progress.set_postfix(loss=f"{float(loss):.4f}")
      if manager and args.checkpoint_every and step % args.checkpoint_every == 0:
        common.save(manager, step, checkpoint_tree(state))
      progress.update(1)
  if manager:
    if manager.latest_step() != int(state.step):
      common.save(manager, int(state.step), checkpoint_tree(state))
    manager.wait_until_finished()
    manager.close()
  final = evaluate(state, ds)
  print(f"{args.dataset} {args.model} {common.describe(args)}: step {int(state.step)},"
        f" {common.metric_name(ds)} {final:.4f}")
  return {"state": state, "history": history, common.metric_name(ds): final}


if __name__ == "__main__":
  main()
