"""fromage_jax: the Fromage optimizer (Bernstein et al., 2020) for JAX and Optax.

Each layer moves by a fixed fraction `eta` of its own norm:
`W <- (W - eta * ||W|| / ||g|| * g) / sqrt(1 + eta**2)`.
"""

from fromage_jax._src.alias import fromage
from fromage_jax._src.diagnostics import deep_relative_trust
from fromage_jax._src.diagnostics import descent_learning_rate_bound
from fromage_jax._src.diagnostics import relative_update_norms
from fromage_jax._src.plateau import FromageOnPlateauState
from fromage_jax._src.plateau import fromage_on_plateau
from fromage_jax._src.stacking import stacked_layer_axes
from fromage_jax._src.transform import NormClipToInitState
from fromage_jax._src.transform import NormProjectToInitState
from fromage_jax._src.transform import PrefactorCorrectionState
from fromage_jax._src.transform import norm_clip_to_init
from fromage_jax._src.transform import norm_project_to_init
from fromage_jax._src.transform import prefactor_correction
from fromage_jax._src.transform import scale_by_frobenius_ratio

__version__ = '0.1.0'

__all__ = (
    'FromageOnPlateauState',
    'NormClipToInitState',
    'NormProjectToInitState',
    'PrefactorCorrectionState',
    'deep_relative_trust',
    'descent_learning_rate_bound',
    'fromage',
    'fromage_on_plateau',
    'norm_clip_to_init',
    'norm_project_to_init',
    'prefactor_correction',
    'relative_update_norms',
    'scale_by_frobenius_ratio',
    'stacked_layer_axes',
)
