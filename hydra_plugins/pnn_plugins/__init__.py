"""Hydra instantiates plugins only from classes defined under ``hydra_plugins``.

The logic lives in ``pnn.sweeper`` and ``pnn.launcher``; these subclasses only give it a name
Hydra accepts.
"""

from pnn.launcher import GpuPoolLauncher as _GpuPoolLauncher
from pnn.sweeper import PNNSweeper as _PNNSweeper


class PNNSweeper(_PNNSweeper):
    """See :class:`pnn.sweeper.PNNSweeper`."""


class GpuPoolLauncher(_GpuPoolLauncher):
    """See :class:`pnn.launcher.GpuPoolLauncher`."""
