"""optax-ortho: orthogonality-based gradient transformations for optax."""

# Submodules: regularisers of GrOD, and the Flax layers of OPT.
from optax_ortho import linen
from optax_ortho import nnx
from optax_ortho import regularizers
from optax_ortho._src.flax_dims import flax_dimension_numbers
from optax_ortho._src.gal import GalState
from optax_ortho._src.gal import gal
from optax_ortho._src.gal import gal_value_and_grad
from optax_ortho._src.gnp import GradientNormPenaltyState
from optax_ortho._src.gnp import gnp_perturbed_params
from optax_ortho._src.gnp import gradient_norm_penalty
from optax_ortho._src.grod import GrodState
from optax_ortho._src.grod import grod
from optax_ortho._src.orthogonal_map import hyperspherical_energy
from optax_ortho._src.orthogonal_map import orthogonal_map
from optax_ortho._src.orthogonal_map import orthogonality_penalty
from optax_ortho._src.orthonormalize import OrthonormalizeState
from optax_ortho._src.orthonormalize import orthogonal_adam
from optax_ortho._src.orthonormalize import orthogonal_sgd
from optax_ortho._src.orthonormalize import orthonormalize
from optax_ortho._src.polar import polar
from optax_ortho._src.stiefel import StiefelSGDState
from optax_ortho._src.stiefel import stiefel_sgd
from optax_ortho._src.train_state import apply_gradients
from optax_ortho._src.value_and_grads import value_and_grads

__version__ = "0.2.2"

__all__ = [
    "GalState",
    "GradientNormPenaltyState",
    "GrodState",
    "OrthonormalizeState",
    "StiefelSGDState",
    "apply_gradients",
    "gal",
    "flax_dimension_numbers",
    "gal_value_and_grad",
    "gnp_perturbed_params",
    "gradient_norm_penalty",
    "grod",
    "hyperspherical_energy",
    "linen",
    "nnx",
    "orthogonal_adam",
    "orthogonal_map",
    "orthogonal_sgd",
    "orthogonality_penalty",
    "orthonormalize",
    "polar",
    "regularizers",
    "stiefel_sgd",
    "value_and_grads",
]
