"""`apply_gradients` with extra arguments for a Flax linen `TrainState`.

`flax.training.train_state.TrainState.apply_gradients(grads=..., **kwargs)`
treats its keyword arguments as fields to `replace`, so it cannot hand
`grad_fn` (gradient_norm_penalty), `regularizer_grads` (grod) or GAL's
arguments to `tx.update`. `nnx.Optimizer.update(model, grads, **kwargs)`
already passes them on and needs no helper.
"""

from __future__ import annotations

from typing import Any
from typing import TypeVar

import optax

_State = TypeVar("_State")


def apply_gradients(state: _State, grads: Any, **extra_args: Any) -> _State:
  """`state.apply_gradients(grads=grads)` that passes `extra_args` to `tx.update`.

  Works with `flax.training.train_state.TrainState` and its subclasses (for
  example one that adds `batch_stats`): any object with `step`, `params`,
  `opt_state`, `tx` fields and a `replace` method. Returns the new state with
  `step` incremented, `params` and `opt_state` updated; every other field is
  kept.

  Args:
    state: the train state.
    grads: gradients with the structure of `state.params`.
    **extra_args: keyword arguments of `state.tx.update`: `grad_fn` for
      `gradient_norm_penalty`, `regularizer_grads` for `grod`, the
      `gal_*` arguments from `gal_value_and_grad` for `gal`. Transforms of the
      chain that do not take an argument ignore it.

  Returns:
    The updated state, of the same type as `state`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, flax.linen as nn
    >>> from flax.training import train_state
    >>> import optax_ortho
    >>> model = nn.Dense(2)
    >>> x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))
    >>> tx = optax.chain(optax_ortho.gradient_norm_penalty(alpha=0.8, radius=0.05),
    ...                  optax.sgd(0.1))
    >>> state = train_state.TrainState.create(
    ...     apply_fn=model.apply, params=model.init(jax.random.key(0), x)["params"], tx=tx)
    >>> def loss_fn(params):
    ...   return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)
    >>> loss, grads = jax.value_and_grad(loss_fn)(state.params)
    >>> state = optax_ortho.apply_gradients(state, grads, grad_fn=jax.grad(loss_fn))
    >>> int(state.step), bool(loss_fn(state.params) < loss)
    (1, True)
  """
  for name in ("step", "params", "opt_state", "tx", "replace"):
    if not hasattr(state, name):
      raise TypeError(
          "state must be a flax.training.train_state.TrainState (or an object"
          f" with step, params, opt_state, tx and replace); {type(state).__name__}"
          f" has no attribute {name!r}."
      )
  s: Any = state
  updates, opt_state = s.tx.update(grads, s.opt_state, s.params, **extra_args)
  return s.replace(
      step=s.step + 1,
      params=optax.apply_updates(s.params, updates),
      opt_state=opt_state,
  )
