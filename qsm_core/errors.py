"""Exceptions raised for bad input.

Every message names the offending file or argument and says how to fix it. The command
line turns these into a one-line error and a non-zero exit status, never a traceback.
"""


class QSMRimError(Exception):
    """Base class of every error qsmrim raises on purpose."""


class InputError(QSMRimError, ValueError):
    """Input data or arguments are unusable (shape, units, missing metadata, NaNs...)."""


class NotEstimableError(QSMRimError, ValueError):
    """A statistic cannot be estimated from the data given (e.g. a single class)."""
