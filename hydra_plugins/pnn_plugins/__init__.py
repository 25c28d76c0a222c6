"""pnn-sweep's Hydra plugins.

- ``GpuPoolLauncher``, ``hydra/launcher=gpu_pool`` in any Hydra app once this project is
  installed: its structured config is registered in Hydra's ConfigStore here, as Hydra's own
  plugins register theirs, when Hydra imports this package to discover its plugins.
- ``SlurmLauncher``, ``hydra/launcher=pnn_slurm``: hydra-submitit-launcher's SLURM launcher
  with each job's own end (``pnn.sweep.slurm``); this app's ``conf/hydra/launcher/slurm.yaml``
  builds on it.
- ``PNNSweeper``, pnn-sweep's own sweeper: it checks every job against pnn's schema and keeps
  an MLflow parent run, so it has no use outside ``sweep.py`` and its config stays in this
  app's ``conf/hydra/sweeper/pnn.yaml``.

The logic lives in ``pnn.sweep.launcher`` and ``pnn.sweep.sweeper``; the subclasses here only give
it a name Hydra accepts (it instantiates plugins only from classes under ``hydra_plugins``). Their
modules are imported, not their classes: discovery lists every plugin class a module here holds, so
a base class bound to a name here would be listed as a second plugin.
"""

from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

from pnn.sweep import launcher, slurm, sweeper


class PNNSweeper(sweeper.PNNSweeper):
    """See :class:`pnn.sweep.sweeper.PNNSweeper`."""


class GpuPoolLauncher(launcher.GpuPoolLauncher):
    """See :class:`pnn.sweep.launcher.GpuPoolLauncher`."""


class SlurmLauncher(slurm.SlurmLauncher):
    """See :class:`pnn.sweep.slurm.SlurmLauncher`."""


@dataclass
class GpuPoolLauncherConf:
    """``hydra/launcher=gpu_pool``: parallel jobs on one machine, each in a process of its own."""

    _target_: str = "hydra_plugins.pnn_plugins.GpuPoolLauncher"
    # GPU indices to hand out, one per job; null: every visible GPU; []: none (CPU workers).
    gpus: list[int] | None = None
    # Jobs that may share one GPU at once.
    jobs_per_gpu: int = 1
    # Parallel jobs when no GPU is used: a number, or auto (the cores this process may use,
    # os.sched_getaffinity, divided by the jobs' train.threads; at least 1). Typed Any so that
    # it takes the word; the launcher checks it.
    cpu_workers: Any = "auto"
    # pnn-sweep's jobs only: jobs that differ only in train.seed trained together in one
    # process, this many at a time (each keeps its own MLflow run and checkpoint).
    seeds_per_process: int = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_pool", node=GpuPoolLauncherConf, provider="pnn-sweep"
)


@dataclass
class SlurmLauncherConf(SlurmQueueConf):
    """``hydra/launcher=pnn_slurm``: submitit's SLURM keys, and how the sweep watches its jobs."""

    _target_: str = "hydra_plugins.pnn_plugins.SlurmLauncher"
    # Seconds between two looks at the jobs (one squeue for all).
    poll_s: float = 10.0
    # Seconds to wait for the result file of a job SLURM says has ended (a shared file system
    # may show it late), before the job counts as lost.
    result_wait_s: float = 15.0


ConfigStore.instance().store(
    group="hydra/launcher", name="pnn_slurm", node=SlurmLauncherConf, provider="pnn-sweep"
)
