"""Train a Flax nnx model with an `nnx.Optimizer` over an optax chain.

    python examples/train_nnx.py                                     # digits, CNN+BN
    python examples/train_nnx.py --optimizer gnp_orthogonal_sgd --steps 500
    python examples/train_nnx.py --dataset cifar10 --model resnet20 --steps 64000 \\
        --batch-size 128 --lr 0.01 --weight-decay 1e-4 --cosine --checkpoint-dir ckpt/nnx

`nnx.Optimizer(model, tx, wrt=nnx.Param)` with `tx` a chain holding
`optax_ortho.orthonormalize` (and `gradient_norm_penalty` for `--optimizer
gnp*`). BatchNorm statistics are `nnx.BatchStat` variables: the forward pass
under `nnx.value_and_grad` updates them in place. The perturbed pass of the
gradient norm penalty runs on a copy of the model built from pure arrays
(`nnx.merge`), so its statistics are thrown away with the copy.

`--checkpoint-dir` saves `nnx.state(model)` (params and BatchNorm statistics)
and `nnx.state(optimizer)` (step and optimizer state) with orbax, and a rerun
resumes from the latest checkpoint to the identical next step.

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

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import data  # noqa: E402
import models  # noqa: E402
import train_common as common  # noqa: E402


def create(args, ds: data.Dataset):
  model = models.NNX[args.model](ds.x_train.shape[1:], common.num_outputs(ds),
                                 rngs=nnx.Rngs(args.seed))
  tx = common.make_optimizer(args, gnp_has_aux=False)
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_train_step(args, ds: data.Dataset):
  loss_of = common.task_loss(ds)
  with_grad_fn = common.needs_grad_fn(args)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    # Pure arrays of the model before this step, for the perturbed pass.
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)

    def loss_fn(model):
      return loss_of(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)  # updates BatchStats
    extra = {}
    if with_grad_fn:
      # `params` arrive as pure arrays; the merged copy's BatchStat updates
      # are dropped with it, so the perturbed pass leaves `model` alone.
      extra["grad_fn"] = jax.grad(
          lambda params: loss_fn(nnx.merge(graphdef, params, rest)))
    optimizer.update(model, grads, **extra)
    return loss

  return train_step


@nnx.jit
def predict(model, x):
  return model(x)


def evaluate(model, ds: data.Dataset, batch_size: int = 1000):
  model.eval()
  outs = [predict(model, ds.normalize(ds.x_test[i:i + batch_size]))
          for i in range(0, len(ds.x_test), batch_size)]
  model.train()
  return common.metric(ds, np.concatenate(outs), ds.y_test)


def checkpoint_tree(model, optimizer) -> dict:
  return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def main(argv=None) -> dict:
  args = common.parse(common.parser(__doc__.split("\n\n")[0]), argv)
  ds = common.load_data(args)
  print(f"{args.dataset} nnx {args.model}: {common.describe(args)}")
  model, optimizer = create(args, ds)
  manager = common.checkpoint_manager(args)
  restored = common.restore_latest(manager, checkpoint_tree(model, optimizer))
  if restored is not None:
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
  train_step = make_train_step(args, ds)
  model.train()

  history = {"step": [], "train_loss": [], common.metric_name(ds): []}
  start = int(optimizer.step[...])
  with tqdm(total=args.steps, initial=min(start, args.steps), unit="step",
            desc=f"nnx {args.model} {args.optimizer}", disable=None) as progress:
    for i in range(start, args.steps):
      x, y = data.batch(ds, args.batch_size, args.seed, i, args.augment)
      loss = train_step(model, optimizer, x, y)
      step = i + 1
      if step % args.eval_every == 0 or step == args.steps:
        history["step"].append(step)
        history["train_loss"].append(float(loss))
        history[common.metric_name(ds)].append(evaluate(model, ds))
        progress.set_postfix(loss=f"{float(loss):.4f}")
      if manager and args.checkpoint_every and step % args.checkpoint_every == 0:
        common.save(manager, step, checkpoint_tree(model, optimizer))
      progress.update(1)
  step = int(optimizer.step[...])
  if manager:
    if manager.latest_step() != step:
      common.save(manager, step, checkpoint_tree(model, optimizer))
    manager.wait_until_finished()
    manager.close()
  final = evaluate(model, ds)
  print(f"{args.dataset} nnx {args.model} {common.describe(args)}: step {step},"
        f" {common.metric_name(ds)} {final:.4f}")
  return {"model": model, "optimizer": optimizer, "history": history,
          common.metric_name(ds): final}


if __name__ == "__main__":
  main()
