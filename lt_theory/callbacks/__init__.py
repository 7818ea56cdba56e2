"""Lightning callbacks, one file each; they call :mod:`lt_theory.measures` and never re-implement it."""

from lt_theory.callbacks.base import TheoryCallback
from lt_theory.callbacks.double_descent import DoubleDescentProbe
from lt_theory.callbacks.imp import IMPPruner
from lt_theory.callbacks.landscape import LossLandscapeMonitor
from lt_theory.callbacks.lmc import LinearModeConnectivity
from lt_theory.callbacks.ntk import NTKDrift
from lt_theory.callbacks.spectral import SpectralNormMonitor

__all__ = [
    "DoubleDescentProbe",
    "IMPPruner",
    "LinearModeConnectivity",
    "LossLandscapeMonitor",
    "NTKDrift",
    "SpectralNormMonitor",
    "TheoryCallback",
]
