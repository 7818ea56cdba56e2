"""Pure-PyTorch mathematics of lt_theory: functions on modules, tensors, state dicts and data loaders.

No Lightning here: every function can be used, tested and benchmarked without a Trainer.

- :mod:`~lt_theory.measures.spectral`: operator norms of linear layers, spectra, spectral complexity, margins.
- :mod:`~lt_theory.measures.lipschitz`: certified graph-aware Lipschitz bounds and the Jacobian lower bound.
- :mod:`~lt_theory.measures.ntk`: the empirical neural tangent kernel and kernel metrics.
- :mod:`~lt_theory.measures.evaluation`: loss and error of a model over a data set, one rule for NaN outputs.
- :mod:`~lt_theory.measures.interpolation`: linear paths between weights, error barriers, BatchNorm reset.
- :mod:`~lt_theory.measures.landscape`: sharpness, PL ratio, predicted and observed rates, gradient/weight
  ratios, activation conditioning.
- :mod:`~lt_theory.measures.pruning`: magnitude and random pruning masks, their enforcement.
- :mod:`~lt_theory.measures.risk`: memorisation of noisy labels, interpolation threshold, peaks, bias-variance.
"""

from lt_theory.measures import evaluation, interpolation, landscape, lipschitz, ntk, pruning, risk, spectral
from lt_theory.measures.evaluation import *  # noqa: F403
from lt_theory.measures.interpolation import *  # noqa: F403
from lt_theory.measures.landscape import *  # noqa: F403
from lt_theory.measures.lipschitz import *  # noqa: F403
from lt_theory.measures.ntk import *  # noqa: F403
from lt_theory.measures.pruning import *  # noqa: F403
from lt_theory.measures.risk import *  # noqa: F403
from lt_theory.measures.spectral import *  # noqa: F403

__all__ = [
    *evaluation.__all__,
    *interpolation.__all__,
    *landscape.__all__,
    *lipschitz.__all__,
    *ntk.__all__,
    *pruning.__all__,
    *risk.__all__,
    *spectral.__all__,
]
