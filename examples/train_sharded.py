"""Data + model parallel training of a Flax MLP with optax-ortho on a device mesh.

    python examples/train_sharded.py                          # 8 virtual CPU devices
    python examples/train_sharded.py --method gradient_norm_penalty
    python examples/train_sharded.py --polar newton_schulz --parallel replicated
    python examples/train_sharded.py --axis-types auto --mesh 4 2

The same script runs unchanged on a TPU pod slice or a multi-GPU host: there
`jax.devices()` are the accelerators (the CPU device count set below only
affects the CPU backend). On several hosts every host runs the same command
with `--distributed` (TPU pods, SLURM: `jax.distributed.initialize()` finds the
cluster by itself) or with the cluster spelled out; two processes of 4 CPU
devices each on this machine (see docs/tpu_pods.md):

    python examples/train_sharded.py --coordinator-address localhost:12355 \
        --num-processes 2 --process-id 0 --local-devices 4 &
    python examples/train_sharded.py --coordinator-address localhost:12355 \
        --num-processes 2 --process-id 1 --local-devices 4

Each process builds only its own rows of every global batch
(`jax.make_array_from_process_local_data`); the loss and the test accuracy are
reduced on the mesh into replicated scalars, so every process prints the same
numbers, and they are those of one process with all the devices. The batch of
step i depends only on (seed, i), so with `--checkpoint-dir` (orbax: each
process writes its own shards; every 100 steps, at the end, and on SIGTERM,
after which it exits with status 143) a rerun resumes from the newest
checkpoint that restores and takes exactly the steps the uninterrupted run
would have taken. docs/long_runs.md: preemption, broken checkpoints, one job
per directory, missing or dead processes, processes with other settings.

The mesh has axes ("data", "model"). The batch is split over "data"; the
hidden layers are tensor-parallel over "model" (the first kernel split by its
output columns, the second by its input rows, Megatron style); optimizer
state follows the parameters. Digits (scikit-learn's 8x8 images, no
download) is the data set.
"""

from __future__ import annotations

import os

# OpenBLAS's own threads (behind jaxlib's CPU LAPACK kernels) busy-wait against
# XLA's; set before jax loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402


def set_cpu_devices(k: int, *, strict: bool) -> None:
  """K CPU devices in this process: only before JAX's backends start.

  Harmless on TPU/GPU (it only affects the CPU backend). When the backend is
  up already (e.g. imported by a test), a different count is an error only if
  `strict`.
  """
  if jax.config.jax_num_cpu_devices == k:
    return
  try:
    jax.config.update("jax_num_cpu_devices", k)
  except RuntimeError:
    if strict:
      raise SystemExit(
          f"error: --local-devices {k}: JAX's CPU backend already started with"
          f" {len(jax.local_devices(backend='cpu'))} devices") from None


# 8 CPU devices when no accelerator is there (--local-devices changes it).
set_cpu_devices(8, strict=False)

import flax.linen as nn  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import long_runs  # noqa: E402

import optax_ortho  # noqa: E402

# ----------------------------------------------------------------- model


def constrain(x: jax.Array, spec: P) -> jax.Array:
  """Sets an activation's sharding on the current mesh (a no-op without one)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if AxisType.Explicit in mesh.axis_types:
    return jax.sharding.reshard(x, spec)
  return jax.lax.with_sharding_constraint(x, spec)


class MLP(nn.Module):
  """Two tensor-parallel hidden layers and a replicated head."""

  hidden: int = 256
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="up")(x))  # columns over "model"
    # Gathered before the row-parallel layer: under Explicit axes a
    # contraction over a dimension sharded on both sides is ambiguous.
    x = constrain(x, P("data", None))
    x = nn.relu(nn.Dense(self.hidden, name="down")(x))  # rows over "model"
    return nn.Dense(self.num_classes, name="head")(x)


# Partition specs of the parameters, by layer: the mesh choice in one place.
PARAM_SPECS = {
    "up": {"kernel": P(None, "model"), "bias": P("model")},
    "down": {"kernel": P("model", None), "bias": P()},
    "head": {"kernel": P(), "bias": P()},
}


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --------------------------------------------------------------- methods

LR = 0.05


def _plain(loss_fn, params, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  return loss, grads, {}


def _with_grad_fn(loss_fn, params, x, y):
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  return loss, grads, {"grad_fn": jax.grad(lambda p: loss_fn(p, x, y))}


def make_method(args, model, loss_fn):
  """(transform, grads(params, x, y) -> (loss, grads, extra update kwargs))."""
  sgd = optax.sgd(LR, momentum=0.9)
  if args.method == "sgd":
    return sgd, lambda p, x, y: _plain(loss_fn, p, x, y)
  if args.method == "orthonormalize":
    return optax.chain(
        optax_ortho.orthonormalize(args.polar, parallel=args.parallel), sgd
    ), lambda p, x, y: _plain(loss_fn, p, x, y)
  if args.method == "gradient_norm_penalty":
    return optax.chain(
        optax_ortho.gradient_norm_penalty(alpha=0.8, radius=0.05), sgd
    ), lambda p, x, y: _with_grad_fn(loss_fn, p, x, y)
  # Every other method registered in examples/compare.py, with its own
  # hyperparameters and extra arguments (e.g. methods added later).
  import compare

  method = compare.METHODS[args.method]
  ctx = compare.Context(model=model, apply_fn=model.apply, loss_fn=loss_fn)
  return method.make(), lambda p, x, y: method.grads(ctx, p, x, y)


def method_names() -> list[str]:
  names = ["sgd", "orthonormalize", "gradient_norm_penalty"]
  try:
    import compare
  except ImportError:  # compare.py needs the examples extras
    return names
  return names + sorted(set(compare.METHODS) - set(names))


# -------------------------------------------------------------- training


def load_data(seed=0):
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = len(x) // 4
  return (x[perm[n_test:]], y[perm[n_test:]]), (x[perm[:n_test]], y[perm[:n_test]])


def start_runtime(args, parser) -> None:
  """CPU device count, then `jax.distributed.initialize` (before any JAX work)."""
  explicit = (args.num_processes, args.process_id)
  if args.coordinator_address is None and explicit != (None, None):
    parser.error("--num-processes and --process-id need --coordinator-address")
  if args.coordinator_address is not None:
    if args.distributed:
      parser.error("--distributed detects the cluster; it does not combine with"
                   " --coordinator-address")
    if None in explicit:
      parser.error("--coordinator-address needs --num-processes and --process-id")
    if not 0 <= args.process_id < args.num_processes:
      parser.error(f"--process-id must be in [0, {args.num_processes}),"
                   f" got {args.process_id}")
  if args.local_devices is not None:
    if args.local_devices < 1:
      parser.error(f"--local-devices must be >= 1, got {args.local_devices}")
    set_cpu_devices(args.local_devices, strict=True)
  if args.coordinator_address is not None or args.distributed:
    # Cross-process collectives of the CPU backend (no-op on TPU/GPU, which
    # have their own); the default of jax 0.10, stated for older ones.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if jax.distributed.is_initialized():  # main() called again in one program
    return
  if args.coordinator_address is not None or args.distributed:
    # With --distributed all three are None: detected (TPU pods, SLURM, MPI).
    long_runs.start_distributed(
        args.coordinator_address, args.num_processes, args.process_id,
        initialization_timeout=args.init_timeout,
        heartbeat_timeout=args.heartbeat_timeout)


def process_rows(sharding: NamedSharding, global_shape) -> slice:
  """The rows of a global batch whose shards live on this process's devices.

  With the batch split over "data" and `jax.make_mesh`'s device order these
  are one contiguous block per process; anything else is reported.
  """
  n = global_shape[0]
  rows = {s[0].indices(n)[:2]
          for s in sharding.addressable_devices_indices_map(global_shape).values()}
  lo, hi = min(r[0] for r in rows), max(r[1] for r in rows)
  if sum(b - a for a, b in rows) != hi - lo:
    raise ValueError(f"process {jax.process_index()} holds rows {sorted(rows)}"
                     " of the batch: not one contiguous block")
  return slice(lo, hi)


def global_batch(sharding: NamedSharding, full: np.ndarray) -> jax.Array:
  """The global array whose shards are `full`'s rows, built from this
  process's rows only (a per-host loader would load just those)."""
  local = full[process_rows(sharding, full.shape)]
  return jax.make_array_from_process_local_data(sharding, local, full.shape)


def batch_indices(seed: int, step: int, n: int, batch_size: int) -> np.ndarray:
  """The examples of step `step`: a function of (seed, step) only, the same on
  every process and after a resume."""
  return np.random.default_rng([seed, step]).integers(0, n, batch_size)


def make_parser() -> argparse.ArgumentParser:
  """The command line; --help states every default."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="orthonormalize", choices=method_names(),
                      help="the optimizer: sgd, or orthonormalize or"
                      " gradient_norm_penalty in front of SGD (momentum 0.9, lr"
                      f" {LR}); the others are examples/compare.py's, with their"
                      " own hyperparameters (default: %(default)s)")
  parser.add_argument("--polar", default="auto",
                      choices=["auto", "svd", "gram", "newton_schulz", "polar_express"],
                      help="polar method of --method orthonormalize (default:"
                      " %(default)s, the library's)")
  parser.add_argument("--parallel", default="layers", choices=["replicated", "layers"],
                      help="orthonormalize: replicate every polar factor, or"
                      " compute each once on one device (default: %(default)s)")
  parser.add_argument("--mesh", type=int, nargs=2, default=None,
                      metavar=("DATA", "MODEL"),
                      help="mesh shape (default: (n/4, 4) on n >= 4 devices,"
                      " else (n, 1))")
  parser.add_argument("--axis-types", default="explicit", choices=["explicit", "auto"],
                      help="axis type of both mesh axes (default: %(default)s)")
  parser.add_argument("--steps", type=int, default=300,
                      help="total training steps, counting those of a resumed"
                      " checkpoint (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=64,
                      help="global batch, over all processes (default: %(default)s)")
  parser.add_argument("--hidden", type=int, default=256,
                      help="width of both hidden layers (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=0,
                      help="data split, initialisation and batches; the same"
                      " on every process (default: %(default)s)")
  parser.add_argument("--log-every", type=int, default=0,
                      help="print the loss of every N-th step, 0: never"
                      " (default: %(default)s)")
  long_run = parser.add_argument_group(
      "long runs", "checkpoints, preemption (SIGTERM: save, then exit with"
      f" status {long_runs.PREEMPTED_EXIT_CODE}) and the resume; see"
      " docs/long_runs.md")
  long_run.add_argument("--checkpoint-dir", default=None,
                        help="save params + optimizer state here with orbax (a"
                        " directory every process can reach; one job at a time)"
                        " and resume from the newest checkpoint there that"
                        " restores (default: no checkpoints)")
  long_run.add_argument("--checkpoint-every", type=int, default=100,
                        help="with --checkpoint-dir, save every N steps as well"
                        " as at the end and on SIGTERM; 0: only those"
                        " (default: %(default)s)")
  cluster = parser.add_argument_group(
      "several processes", "every process runs the same command; give either"
      " --distributed or the other three of --coordinator-address,"
      " --num-processes, --process-id")
  cluster.add_argument("--distributed", action="store_true",
                       help="jax.distributed.initialize() with the cluster"
                       " auto-detected (Cloud TPU pods, SLURM, Open MPI)")
  cluster.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                       help="address of process 0's coordinator service")
  cluster.add_argument("--num-processes", type=int, default=None, metavar="N")
  cluster.add_argument("--process-id", type=int, default=None, metavar="I")
  cluster.add_argument("--local-devices", type=int, default=None, metavar="K",
                       help="CPU devices per process (default: 8; no effect on"
                       " TPU/GPU)")
  cluster.add_argument("--init-timeout", type=int, default=300, metavar="S",
                       help="seconds to wait for every process to connect to"
                       " the coordinator (default: %(default)s)")
  cluster.add_argument("--heartbeat-timeout", type=int, default=100, metavar="S",
                       help="seconds without a heartbeat after which a process"
                       " counts as dead and the others abort (default: %(default)s)")
  return parser


def main(argv=None) -> dict:
  parser = make_parser()
  args = parser.parse_args(argv)
  for flag in ("checkpoint_every", "log_every"):
    if getattr(args, flag) < 0:
      parser.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
  for flag in ("init_timeout", "heartbeat_timeout"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
  start_runtime(args, parser)
  long_runs.check_same_config(shared_config(args))
  with contextlib.ExitStack() as cleanup:
    return train(args, parser, cleanup)


def shared_config(args) -> dict:
  """The flags every process must get alike: all but the per-process ones."""
  own = ("process_id", "local_devices")
  return {"--" + k.replace("_", "-"): v for k, v in sorted(vars(args).items())
          if k not in own}


def open_checkpoints(args, cleanup: contextlib.ExitStack):
  """The orbax manager of --checkpoint-dir, locked for this job; or None.

  Process 0 takes the directory's lock (two jobs in one directory overwrite
  each other's steps); every process learns whether it could.
  """
  import train_common  # orbax helpers shared with train_linen.py / train_nnx.py

  if not args.checkpoint_dir:
    return None
  refused = None
  local = "://" not in args.checkpoint_dir  # a bucket has no exclusive create
  if local and jax.process_index() == 0:
    lock = long_runs.DirectoryLock(os.path.abspath(args.checkpoint_dir))
    try:
      warning = lock.acquire()
    except long_runs.DirectoryLockedError as e:
      refused = str(e)
    else:
      cleanup.callback(lock.release)
      if warning:
        print(warning, file=sys.stderr, flush=True)
  if local and long_runs.any_process(refused is not None):
    raise SystemExit(f"error: {refused or '--checkpoint-dir is in use by another job'}")
  # What the saved state and the data split depend on; --steps, the mesh
  # and the process count may change between runs.
  long_runs.check_checkpoint_settings(args.checkpoint_dir, {
      f"--{k}": getattr(args, k) for k in ("method", "polar", "hidden", "seed")})
  manager = train_common.checkpoint_manager(args)
  cleanup.callback(manager.close)
  return manager


def train(args, parser, cleanup: contextlib.ExitStack) -> dict:
  n = jax.device_count()
  shape = tuple(args.mesh) if args.mesh else ((n // 4, 4) if n >= 4 else (n, 1))
  axis_type = AxisType.Explicit if args.axis_types == "explicit" else AxisType.Auto
  mesh = jax.make_mesh(shape, ("data", "model"), axis_types=(axis_type,) * 2)
  if args.batch_size % shape[0] or args.hidden % shape[1]:
    parser.error(f"--batch-size must divide by {shape[0]} and --hidden by {shape[1]}")

  (x_train, y_train), (x_test, y_test) = load_data(args.seed)
  model = MLP(hidden=args.hidden)

  def loss_fn(params, x, y):
    return cross_entropy(model.apply(params, x), y)

  tx, grads_fn = make_method(args, model, loss_fn)
  import train_common

  manager = open_checkpoints(args, cleanup)
  # SIGTERM (preemption) saves and stops, but only where there is a place to
  # save to; otherwise it ends the process as usual.
  preemption = cleanup.enter_context(long_runs.Preemption()) if manager else None

  with jax.set_mesh(mesh):
    batch_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    param_shardings = {"params": jax.tree.map(
        lambda s: NamedSharding(mesh, s), PARAM_SPECS)}
    # Key and dummy input made inside the jitted function: every input of a
    # computation that spans processes must be a global array.
    params = jax.jit(
        lambda: model.init(jax.random.key(args.seed),
                           jnp.zeros((shape[0], x_train.shape[1]))),
        out_shardings=param_shardings)()
    opt_state = jax.jit(tx.init)(params)
    state_shardings = jax.tree.map(lambda a: a.sharding, opt_state)
    start = 0
    if manager:
      # Into the shardings of the fresh state.
      restored_step, restored = long_runs.restore_newest(
          manager, {"params": params, "opt_state": opt_state},
          log=lambda line: print(line, file=sys.stderr, flush=True))
      if restored is not None:
        start = restored_step
        params, opt_state = restored["params"], restored["opt_state"]

    # Shardings pinned on the way out, so that every step sees the same input
    # shardings (no recompilation under Auto axes) and the buffers are reused;
    # the loss comes out replicated, readable on every process.
    def step(params, opt_state, x, y):
      loss, grads, extra = grads_fn(params, x, y)
      updates, opt_state = tx.update(grads, opt_state, params, **extra)
      return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step, out_shardings=(param_shardings, state_shardings, replicated),
                   donate_argnums=(0, 1))
    # An integer count of correct predictions: exact whatever the reduction
    # order across devices and processes.
    correct = jax.jit(
        lambda p, x, y: jnp.sum(jnp.argmax(model.apply(p, x), -1) == y),
        out_shardings=replicated)

    times, losses = [], []
    done, preempted = max(start, args.steps), False
    for i in range(start, args.steps):
      idx = batch_indices(args.seed, i, len(x_train), args.batch_size)
      x = global_batch(batch_sharding, x_train[idx])
      y = global_batch(batch_sharding, y_train[idx])
      t0 = time.perf_counter()
      params, opt_state, loss = step(params, opt_state, x, y)
      losses.append(float(loss))
      if i > start:  # the first step compiles
        times.append(time.perf_counter() - t0)
      if args.log_every and (i + 1) % args.log_every == 0:
        # 9 significant digits: a float32 printed exactly.
        print(f"step {i + 1} loss {losses[-1]:.9g}", flush=True)
      if manager and args.checkpoint_every and (i + 1) % args.checkpoint_every == 0:
        train_common.save(manager, i + 1, {"params": params, "opt_state": opt_state})
      if preemption and preemption.reached():  # the same step on every process
        done, preempted = i + 1, True
        break
    if manager:
      if manager.latest_step() != done:
        train_common.save(manager, done, {"params": params, "opt_state": opt_state})
      manager.wait_until_finished()
    if preempted:  # the grace period is short: no evaluation
      got = preemption.received
      print(f"preempted ({signal.Signals(got).name if got else 'another process'})"
            f" after step {done}: saved it in {args.checkpoint_dir}; rerun the"
            " same command to resume", flush=True)
      hits, n_eval = 0, 0
    else:
      n_eval = len(x_test) - len(x_test) % shape[0]
      hits = int(correct(params, global_batch(batch_sharding, x_test[:n_eval]),
                         global_batch(batch_sharding, y_test[:n_eval])))
    accuracy = hits / n_eval if n_eval else float("nan")
    kept = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree.leaves(params), jax.tree.leaves(param_shardings)))

  result = {
      "method": args.method, "polar": args.polar, "parallel": args.parallel,
      "mesh": dict(zip(("data", "model"), shape)), "axis_types": args.axis_types,
      "devices": n, "processes": jax.process_count(),
      "process_index": jax.process_index(), "platform": jax.devices()[0].platform,
      "start_step": start, "end_step": done, "preempted": preempted,
      "losses": losses,
      "first_loss": losses[0] if losses else float("nan"),
      "final_loss": float(np.mean(losses[-10:])) if losses else float("nan"),
      "test_accuracy": accuracy,
      "ms_per_step": 1e3 * float(np.median(times)) if times else float("nan"),
      "param_shardings_kept": kept,
  }
  print(f"{n} {result['platform']} devices in {jax.process_count()} process(es),"
        f" mesh {result['mesh']} ({args.axis_types} axes), method {args.method}"
        + (f" [{args.polar}, {args.parallel}]" if args.method == "orthonormalize" else "")
        + (f", resumed at step {start}" if start else ""))
  print(f"loss {result['first_loss']:.9g} -> {result['final_loss']:.9g},"
        + (" not evaluated (preempted)" if preempted
           else f" test accuracy {accuracy:.9g} ({hits}/{n_eval})"))
  print(f"{result['ms_per_step']:.2f} ms/step (process {jax.process_index()})")
  return result


if __name__ == "__main__":
  sys.exit(long_runs.PREEMPTED_EXIT_CODE if main()["preempted"] else 0)
