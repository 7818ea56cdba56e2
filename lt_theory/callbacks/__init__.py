"""Lightning callbacks, one file each; they call :mod:`lt_theory.measures` and never re-implement it."""

from lt_theory.callbacks.base import TheoryCallback

__all__ = ["TheoryCallback"]
