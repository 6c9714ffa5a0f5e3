"""`apply_gradients` with extra arguments for a Flax linen `TrainState`.

`flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)`
treats its keyword arguments as fields to `replace`, so it cannot hand
`grad_fn` (gradient_norm_penalty), `regularizer_grads` (grod) or GAL's
arguments to `tx.update`. `nnx.Optimizer.update(model, grads, **kwargs)`
already passes them on and needs no helper.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any
from typing import TypeVar

import optax

_State = TypeVar("_State")

# Keyword-only arguments of `update` that the transforms of optax-ortho and of
# optax take; any other keyword reaches no transform and is reported.
KNOWN_EXTRA_ARGS = frozenset({
    "grad_fn", "perturbed_grads",  # gradient_norm_penalty (and optax.contrib.sam)
    "regularizer_grads",  # grod
    "gal_logits", "gal_logits_grad", "gal_sample_loss", "gal_vjp",  # gal
    "value", "grad", "value_fn", "obj_fn",  # optax's line searches, plateau, sophia
})
# Computed by apply_gradients itself.
_COMPUTED_FIELDS = ("step", "params", "opt_state")


def _field_names(state: Any) -> tuple[str, ...]:
  if dataclasses.is_dataclass(state):
    return tuple(f.name for f in dataclasses.fields(state))
  return tuple(name for name in vars(state) if not name.startswith("_"))


def _split_keywords(state: Any, kwargs: dict[str, Any]) -> tuple[dict, dict]:
  """(fields to replace, extra arguments of tx.update); warns on a keyword that is neither."""
  fields = _field_names(state)
  for name in _COMPUTED_FIELDS:
    if name in kwargs:
      raise ValueError(
          f"apply_gradients computes {name!r} itself; it cannot be passed as a"
          " keyword argument.")
  replace = {k: v for k, v in kwargs.items() if k in fields}
  extra = {k: v for k, v in kwargs.items() if k not in fields}
  unknown = sorted(set(extra) - KNOWN_EXTRA_ARGS)
  if unknown:
    warnings.warn(
        f"apply_gradients: keyword argument(s) {unknown} name no field of"
        f" {type(state).__name__} (fields: {', '.join(fields)}) and no extra"
        " argument of an optax-ortho or optax transform; they are passed to"
        " tx.update, where transforms that do not take them ignore them. A"
        " misspelt field would be left unchanged.",
        stacklevel=3,
    )
  return replace, extra


def apply_gradients(state: _State, grads: Any, **kwargs: Any) -> _State:
  """`state.apply_gradients(grads=grads)` that also passes extra arguments to `tx.update`.

  Works with `flax.training.train_state.TrainState` and its subclasses (for
  example one that adds `batch_stats`): any object with `step`, `params`,
  `opt_state`, `tx` fields and a `replace` method. Returns the new state with
  `step` incremented, `params` and `opt_state` updated.

  A keyword that names a field of the state replaces it, as Flax's own
  `apply_gradients` does (`batch_stats=new_stats`); every other keyword goes
  to `tx.update` (`grad_fn`, `regularizer_grads`, GAL's arguments). A keyword
  that is neither a field nor an extra argument any transform of optax-ortho
  or optax takes gives a warning, since the transforms of a chain ignore what
  they do not take and a misspelt field would silently stay as it was.

  Args:
    state: the train state.
    grads: gradients with the structure of `state.params`.
    **kwargs: fields of the state to replace, and keyword arguments of
      `state.tx.update`: `grad_fn` (or `perturbed_grads`) for
      `gradient_norm_penalty`, `regularizer_grads` for `grod`, the `gal_*`
      arguments from `gal_value_and_grad` for `gal`.

  Returns:
    The updated state, of the same type as `state`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> from flax.training import train_state
    >>> import optax_ortho
    >>> class State(train_state.TrainState):
    ...   batch_stats: dict
    >>> model = nn.Sequential([nn.Dense(4), nn.BatchNorm(use_running_average=False)])
    >>> x, y = jnp.arange(12.0).reshape(4, 3), jnp.zeros((4, 4))
    >>> variables = model.init(jax.random.key(0), x)
    >>> tx = optax.chain(optax_ortho.gradient_norm_penalty(alpha=0.8, radius=0.05),
    ...                  optax.sgd(0.1))
    >>> state = State.create(apply_fn=model.apply, params=variables["params"], tx=tx,
    ...                      batch_stats=variables["batch_stats"])
    >>> def loss_fn(params):
    ...   out, new = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
    ...                             x, mutable=["batch_stats"])
    ...   return jnp.mean((out - y) ** 2), new["batch_stats"]
    >>> (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    >>> grad_fn = jax.grad(lambda p: loss_fn(p)[0])
    >>> new_state = optax_ortho.apply_gradients(state, grads, grad_fn=grad_fn,
    ...                                         batch_stats=stats)
    >>> int(new_state.step), bool(loss_fn(new_state.params)[0] < loss)
    (1, True)
    >>> old, new = variables["batch_stats"], new_state.batch_stats
    >>> jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old, new)
    {'layers_1': {'mean': True, 'var': True}}
  """
  for name in ("step", "params", "opt_state", "tx", "replace"):
    if not hasattr(state, name):
      raise TypeError(
          "state must be a flax.training.train_state.TrainState (or an object"
          f" with step, params, opt_state, tx and replace); {type(state).__name__}"
          f" has no attribute {name!r}."
      )
  s: Any = state
  replace, extra = _split_keywords(s, kwargs)
  updates, opt_state = s.tx.update(grads, s.opt_state, s.params, **extra)
  return s.replace(
      step=s.step + 1,
      params=optax.apply_updates(s.params, updates),
      opt_state=opt_state,
      **replace,
  )
