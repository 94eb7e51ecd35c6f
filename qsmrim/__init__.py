"""qsmrim application layer: the ``qsmrim`` console script.

The command line only parses arguments, calls the Python API of ``qsm_core``, ``rimnet``,
``training`` and ``evaluation``, and writes; no algorithm lives here.
"""

from qsm_core import __version__

__all__ = ["__version__"]
