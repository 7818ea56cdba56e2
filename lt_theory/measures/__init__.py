"""Pure-PyTorch mathematics of lt_theory: functions on modules, tensors, state dicts and data loaders."""

from lt_theory.measures.lipschitz import (  # noqa: F401 (re-exports)
    JacobianNormResult,
    LipschitzBound,
    UnsupportedModelError,
    jacobian_lipschitz_lower_bound,
    lipschitz_upper_bound,
    naive_lipschitz_product,
)
from lt_theory.measures.spectral import (  # noqa: F401 (re-exports)
    OperatorNormResult,
    OperatorSpectrum,
    SpectralComplexity,
    batchnorm_lipschitz,
    dense_operator,
    normalized_margins,
    operator_norm,
    operator_spectrum,
    spectral_complexity,
)
