"""lt_theory: deep learning theory, measured in your own training runs.

PyTorch Lightning callbacks that watch, while a model trains, the conditions deep learning theory names
for training to work: Lipschitz control and conditioning, lazy vs. feature learning, linear mode
connectivity, sparse trainable subnetworks, over-parameterisation and double descent, sharpness and the
Polyak-Łojasiewicz geometry of the loss. The mathematics is in :mod:`lt_theory.measures` (pure PyTorch), the
callbacks in :mod:`lt_theory.callbacks`, data and models for the recipes in :mod:`lt_theory.data` and
:mod:`lt_theory.models`.
"""

from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.callbacks.imp import IMPPruner
from lt_theory.callbacks.landscape import LossLandscapeMonitor
from lt_theory.callbacks.lmc import LinearModeConnectivity
from lt_theory.callbacks.ntk import NTKDrift
from lt_theory.callbacks.spectral import SpectralNormMonitor
from lt_theory.module import ClassificationModule
from lt_theory.report import TheoryReport, diagnose

__version__ = "0.1.0"

__all__ = [
    "ClassificationModule",
    "DoubleDescentProbe",
    "IMPPruner",
    "LinearModeConnectivity",
    "LossLandscapeMonitor",
    "NTKDrift",
    "SpectralNormMonitor",
    "TheoryReport",
    "__version__",
    "diagnose",
]
