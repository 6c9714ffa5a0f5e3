"""The contract every public transform of optax-ortho passes.

A test module describes its transform with a `ContractCase` and binds the suite:

    test_contract = contract_suite([ContractCase(...)])

which becomes one parametrised test per (case, check). The checks: jit,
optax.chain, optax.inject_hyperparams, optax.MultiSteps, no retrace, dtype kept
(float32 and bfloat16), state round-trips through flax.serialization, minimises a
parabola and the Rosenbrock function, and sharded == unsharded on a 2 x 4 mesh of
Auto and of Explicit axes (over three steps, including a conv kernel sharded on
its reduction axes) with the shardings of updates, parameters and state kept
(checked on `jax.typeof` under Explicit axes) and one trace only, also for
arrays sharded by `jax.device_put` without any `jax.set_mesh` context; and
`optax.apply_if_finite` around the transform skips a NaN step with its state
unchanged bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LossFn = Callable[[Any], jax.Array]
# (loss_fn, params, grads) -> keyword-only extra arguments of `update`.
ExtraArgsFn = Callable[[LossFn, Any, Any], dict]


def _no_extra_args(loss_fn, params, grads):
  del loss_fn, params, grads
  return {}


@dataclasses.dataclass(frozen=True)
class ContractCase:
  """A public transform under test.

  Attributes:
    name: test id.
    make: builds the transform from keyword hyperparameters (the callable that
      `optax.inject_hyperparams` wraps).
    hyperparams: float hyperparameters passed to `make` (and injected).
    extra_args: builds the extra keyword arguments of `update`.
    optimizer: what follows the transform when minimising (None: the transform
      is a full optimizer itself).
    steps: steps for the minimisation checks.
    rosenbrock_tol: final Rosenbrock loss must be below this fraction of the
      initial one.
    atol: tolerance for comparisons (jit, sharded, injected).
    static_args: numeric arguments of `make` that must stay Python values under
      `optax.inject_hyperparams` (its `static_args`).
    skip: names of checks that do not apply, with the reason as value.
  """

  name: str
  make: Callable[..., optax.GradientTransformation]
  hyperparams: dict[str, float]
  extra_args: ExtraArgsFn = _no_extra_args
  optimizer: Callable[[], optax.GradientTransformation] | None = (
      lambda: optax.adam(optax.cosine_decay_schedule(0.05, 300))
  )
  steps: int = 300
  rosenbrock_tol: float = 0.05
  atol: float = 1e-5
  static_args: tuple[str, ...] = ()
  skip: dict[str, str] = dataclasses.field(default_factory=dict)

  def tx(self) -> optax.GradientTransformation:
    return self.make(**self.hyperparams)

  def __str__(self) -> str:
    return self.name


# ------------------------------------------------------------------ problems

_TARGET = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)


def parabola(params):
  w, b = params["w"].astype(jnp.float32), params["b"].astype(jnp.float32)
  return 0.5 * (jnp.sum(jnp.square(w - _TARGET))
                + jnp.sum(jnp.square(b - _TARGET[0])))


def parabola_params(dtype=jnp.float32):
  return {"w": jnp.zeros((8, 16), dtype), "b": jnp.zeros((16,), dtype)}


def rosenbrock(params):
  # A (k, 2) matrix of k independent 2-D Rosenbrock problems.
  x, y = params["xy"][:, 0], params["xy"][:, 1]
  return jnp.sum(jnp.square(1.0 - x) + 100.0 * jnp.square(y - x * x))


def rosenbrock_params():
  return {"xy": jnp.tile(jnp.array([[-1.0, 1.5]]), (4, 1))
          + 0.1 * jnp.arange(8.0).reshape(4, 2)}


def mixed_params(dtype=jnp.float32, seed=0):
  """Leaves of the layouts a Flax model has: conv, dense, bias, a square one."""
  rng = np.random.default_rng(seed)
  shapes = {
      "conv": (3, 3, 4, 8), "dense": (8, 16), "square": (16, 16), "bias": (16,),
  }
  return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def mixed_loss(params):
  return sum(jnp.sum(jnp.sin(p.astype(jnp.float32)) ** 2)
             for p in jax.tree.leaves(params))


def _step(tx, loss_fn, extra_args):
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(
        grads, state, params, **extra_args(loss_fn, params, grads))
    return optax.apply_updates(params, updates), state, updates
  return step


def _assert_close(a, b, atol, rtol=1e-4):
  jax.tree.map(
      lambda x, y: np.testing.assert_allclose(
          np.asarray(x, np.float32), np.asarray(y, np.float32),
          atol=atol, rtol=rtol),
      a, b)


# -------------------------------------------------------------------- checks

def check_jit(case: ContractCase):
  tx = case.tx()
  params = mixed_params()
  state = tx.init(params)
  eager = _step(tx, mixed_loss, case.extra_args)(params, state)
  jitted = jax.jit(_step(tx, mixed_loss, case.extra_args))(params, state)
  _assert_close(eager[2], jitted[2], case.atol)


def check_chain(case: ContractCase):
  tx = optax.chain(optax.identity(), case.tx(), optax.scale(-0.1))
  params = mixed_params()
  state = tx.init(params)
  step = jax.jit(_step(tx, mixed_loss, case.extra_args))
  ref = jax.jit(_step(case.tx(), mixed_loss, case.extra_args))
  _, _, upd = step(params, state)
  _, _, ref_upd = ref(params, case.tx().init(params))
  _assert_close(upd, jax.tree.map(lambda u: -0.1 * u, ref_upd), case.atol)


def check_inject_hyperparams(case: ContractCase):
  injected = optax.inject_hyperparams(
      case.make, static_args=case.static_args)(**case.hyperparams)
  params = mixed_params()
  state = injected.init(params)
  for name, value in case.hyperparams.items():
    np.testing.assert_allclose(state.hyperparams[name], value, rtol=1e-6)
  step = jax.jit(_step(injected, mixed_loss, case.extra_args))
  _, state, upd = step(params, state)
  _, _, ref = jax.jit(_step(case.tx(), mixed_loss, case.extra_args))(
      params, case.tx().init(params))
  _assert_close(upd, ref, case.atol)
  # A changed hyperparameter takes effect without a retrace of the step.
  for name in case.hyperparams:
    state.hyperparams[name] = state.hyperparams[name] * 0.5
  _, state, _ = step(params, state)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state))


def check_multi_steps(case: ContractCase):
  tx = optax.MultiSteps(case.tx(), every_k_schedule=2)
  params = mixed_params()
  state = tx.init(params)
  step = jax.jit(_step(tx, mixed_loss, case.extra_args))
  p1, state, upd1 = step(params, state)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(upd1))
  p2, state, upd2 = step(p1, state)
  assert any(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(upd2))
  assert all(bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(upd2))


def check_no_retrace(case: ContractCase):
  tx = case.tx()
  traces = []
  inner = _step(tx, mixed_loss, case.extra_args)

  def counted(params, state):
    traces.append(1)
    return inner(params, state)

  step = jax.jit(counted)
  params = mixed_params()
  state = tx.init(params)
  for _ in range(3):
    params, state, _ = step(params, state)
  assert len(traces) == 1, f"{case.name} retraced: {len(traces)} traces"


def check_dtype(case: ContractCase):
  for dtype in (jnp.float32, jnp.bfloat16):
    tx = case.tx()
    params = mixed_params(dtype)
    state = tx.init(params)
    _, state, upd = jax.jit(_step(tx, mixed_loss, case.extra_args))(params, state)
    for u, p in zip(jax.tree.leaves(upd), jax.tree.leaves(params)):
      assert u.dtype == p.dtype, (case.name, u.dtype, p.dtype)
      assert bool(jnp.isfinite(u.astype(jnp.float32)).all())


def check_state_serialization(case: ContractCase):
  tx = case.tx()
  params = mixed_params()
  state = tx.init(params)
  _, state, _ = jax.jit(_step(tx, mixed_loss, case.extra_args))(params, state)
  for leaf in jax.tree.leaves(state):
    assert isinstance(leaf, (jax.Array, np.ndarray)), type(leaf)
  blob = flax.serialization.to_bytes(state)
  restored = flax.serialization.from_bytes(tx.init(params), blob)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  _assert_close(restored, state, 0.0, 0.0)


def _minimise(case, loss_fn, params):
  tx = case.tx() if case.optimizer is None else optax.chain(
      case.tx(), case.optimizer())
  state = tx.init(params)
  step = jax.jit(_step(tx, loss_fn, case.extra_args))
  first = float(loss_fn(params))
  for _ in range(case.steps):
    params, state, _ = step(params, state)
  return first, float(loss_fn(params))


def check_parabola(case: ContractCase):
  first, last = _minimise(case, parabola, parabola_params())
  assert last < 1e-2 * first, (case.name, first, last)


def check_rosenbrock(case: ContractCase):
  first, last = _minimise(case, rosenbrock, rosenbrock_params())
  assert last < case.rosenbrock_tol * first, (case.name, first, last)


def _mesh(axis_type):
  return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


# "conv" is split on an input-channel (reduction) axis and its output axis,
# "conv_reduction" on two reduction axes (kernel height and input channels):
# the layout on which optax.contrib.scale_by_muon's reshape fails under
# Explicit axes.
_SPECS = {"conv": P(None, None, "data", "model"), "dense": P("data", "model"),
          "square": P("model", None), "bias": P("model"),
          "conv_reduction": P("data", None, "model", None)}


def sharded_params(seed=0):
  """`mixed_params` plus a conv kernel sharded on its reduction axes."""
  params = mixed_params(seed=seed)
  rng = np.random.default_rng(seed + 1)
  params["conv_reduction"] = jnp.asarray(
      rng.standard_normal((2, 3, 8, 8)), jnp.float32)
  return params


_SHARDED_STEPS = 3


def _check_sharded(case: ContractCase, axis_type, *, mesh_context=True):
  """Sharded == unsharded, shardings kept and stable, one trace, 3 steps.

  With ``mesh_context=False`` the parameters are sharded with
  ``jax.device_put(x, NamedSharding(mesh, spec))`` and the step is a bare
  ``jax.jit`` outside ``jax.set_mesh``: the commonest way to shard, where the
  library must take the mesh from the arrays' own shardings. ``init`` is then
  called eagerly, as a bare ``jax.jit(optax.adam(0.1).init)`` of such arrays
  fails in jax itself.
  """
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (jax_num_cpu_devices=8 in conftest.py)")
  tx = case.tx()
  params = sharded_params()
  step = _step(tx, mixed_loss, case.extra_args)
  ref_step = jax.jit(step)
  refs, ref_params, ref_state = [], params, tx.init(params)
  for _ in range(_SHARDED_STEPS):
    ref_params, ref_state, ref_upd = ref_step(ref_params, ref_state)
    refs.append(ref_upd)

  traces = []

  def counted(params, state):
    traces.append(1)
    return step(params, state)

  mesh = _mesh(axis_type)
  explicit = axis_type == AxisType.Explicit
  shardings = {k: NamedSharding(mesh, s) for k, s in _SPECS.items()}
  context = jax.set_mesh(mesh) if mesh_context else contextlib.nullcontext()
  with context:
    sp = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
    sstate = jax.jit(tx.init)(sp) if mesh_context else tx.init(sp)
    states = [sstate]
    sstep = jax.jit(counted)
    for i in range(_SHARDED_STEPS):
      sp, sstate, upd = sstep(sp, sstate)
      states.append(sstate)
      _assert_close(upd, refs[i], case.atol)
      for k in _SPECS:
        for what, x in (("update", upd[k]), ("new param", sp[k])):
          assert x.sharding.is_equivalent_to(shardings[k], x.ndim), (
              case.name, i, what, k, x.sharding, shardings[k])
          if explicit:
            # The type itself carries the sharding under Explicit axes.
            t = jax.typeof(x)
            assert (t.shape, t.dtype, t.sharding.spec) == (
                params[k].shape, params[k].dtype, shardings[k].spec), (
                    case.name, i, what, k, t)
    # Under Explicit axes a changed state type (sharding, dtype, weak type)
    # would retrace the step, so it must equal the state type of `init`;
    # under Auto axes XLA picks init's shardings, so only steps are compared.
    # An eager `init` (no mesh context) leaves scalars such as Adam's count
    # uncommitted, so the state type settles after the first step (one
    # retrace, as with optax.adam itself); compare from there.
    first = 0 if explicit and mesh_context else 1
    for later in states[first + 1:]:
      for a, b in zip(jax.tree.leaves(states[first]), jax.tree.leaves(later)):
        if explicit:
          assert jax.typeof(a) == jax.typeof(b), (
              case.name, jax.typeof(a), jax.typeof(b))
        else:
          assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
              case.name, a.sharding, b.sharding)
  assert len(traces) <= (1 if mesh_context else 2), (
      f"{case.name} retraced across sharded steps: {len(traces)} traces")


def check_sharded_explicit(case: ContractCase):
  _check_sharded(case, AxisType.Explicit)


def check_sharded_auto(case: ContractCase):
  _check_sharded(case, AxisType.Auto)


def check_sharded_no_mesh(case: ContractCase):
  _check_sharded(case, AxisType.Explicit, mesh_context=False)


def check_apply_if_finite(case: ContractCase):
  """`optax.apply_if_finite` skips a NaN step: state kept bit for bit.

  The transform (followed by its optimizer, i.e. as a chain) is wrapped; the
  second of three steps gets a NaN gradient entry. That step must return zero
  updates and the wrapped state unchanged, and the third step must equal a
  clean step taken right after the first: nothing lost, nothing poisoned.
  Extra arguments of `update` reach the wrapped transform.
  """
  inner = case.tx() if case.optimizer is None else optax.chain(
      case.tx(), case.optimizer())
  tx = optax.apply_if_finite(inner, max_consecutive_errors=3)

  @jax.jit
  def step(params, state, poisoned):
    grads = jax.grad(mixed_loss)(params)
    extra = case.extra_args(mixed_loss, params, grads)
    dense = grads["dense"]
    grads["dense"] = jnp.where(
        poisoned, dense.at[0, 0].set(jnp.nan), dense)
    updates, state = tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), state, updates

  params = mixed_params()
  p1, s1, _ = step(params, tx.init(params), False)
  p2, s2, u2 = step(p1, s1, True)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(u2))
  assert int(s2.notfinite_count) == 1 and int(s2.total_notfinite) == 1
  for a, b in zip(jax.tree.leaves((p1, s1.inner_state)),
                  jax.tree.leaves((p2, s2.inner_state)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  p3, s3, u3 = step(p2, s2, False)
  pc, sc, uc = step(p1, s1, False)
  assert int(s3.notfinite_count) == 0
  _assert_close(u3, uc, 0.0, 0.0)
  _assert_close((p3, s3.inner_state), (pc, sc.inner_state), 0.0, 0.0)
  assert all(bool(jnp.isfinite(x).all())
             for x in jax.tree.leaves((p3, s3.inner_state)))


CHECKS: dict[str, Callable[[ContractCase], None]] = {
    "jit": check_jit,
    "chain": check_chain,
    "inject_hyperparams": check_inject_hyperparams,
    "multi_steps": check_multi_steps,
    "no_retrace": check_no_retrace,
    "dtype": check_dtype,
    "state_serialization": check_state_serialization,
    "parabola": check_parabola,
    "rosenbrock": check_rosenbrock,
    "sharded_explicit": check_sharded_explicit,
    "sharded_auto": check_sharded_auto,
    "sharded_no_mesh": check_sharded_no_mesh,
    "apply_if_finite": check_apply_if_finite,
}


# Checks every case runs in the default (fast) test run; the others run under
# `-m slow` (CI runs both). The default run stays within a few minutes on 2
# cores: the sharded, chain and dtype checks of every case add about 3 minutes.
FAST_CHECKS = ("jit", "parabola")


def _marks(case: ContractCase, check: str) -> list:
  if check in case.skip:
    return [pytest.mark.skip(reason=case.skip[check])]
  return [] if check in FAST_CHECKS else [pytest.mark.slow]


def contract_suite(cases: list[ContractCase]):
  """A pytest test function parametrised over every (case, check)."""
  params = [
      pytest.param(case, check, id=f"{case.name}-{check}",
                   marks=_marks(case, check))
      for case in cases for check in CHECKS
  ]

  @pytest.mark.parametrize(("case", "check"), params)
  def test_contract(case, check):
    CHECKS[check](case)

  return test_contract
