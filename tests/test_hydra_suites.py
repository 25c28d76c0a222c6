"""Hydra's own launcher test suites, run on ``hydra/launcher=gpu_pool`` as Hydra's official
launcher plugins (joblib, submitit, ray) run them on themselves.

The suites come with hydra-core (``hydra.test_utils``), with the apps and configs they use:
``LauncherTestSuite`` sweeps ``hydra.test_utils.a_module`` over ``hydra/test_utils/configs``
in this process, ``IntegrationTestSuite`` writes its own ``task.py`` into a temporary folder
and runs it with ``python task.py -m``; nothing is copied into this repository. The fixtures
(``hydra_sweep_runner``, ``hydra_restore_singletons``) come from Hydra's pytest plugin.

``BatchedSweeperTestSuite`` runs the basic sweeper in batches on the launcher (job numbers go on
across batches). pnn-sweep's own sweeper is not run on Hydra's suites: it sweeps pnn's jobs
only (it validates each against pnn's schema and keeps an MLflow parent run), so its config is
not registered for other apps.

Without GPUs two CPU workers run the jobs (with GPUs, one job per GPU); every job starts a
process, so these are slow.
"""

from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import (
    BatchedSweeperTestSuite,
    IntegrationTestSuite,
    LauncherTestSuite,
)

pytestmark = pytest.mark.slow

GPU_POOL = ["hydra.launcher.cpu_workers=2"]
# The launcher suites check each job's log in its working dir, i.e. Hydra's chdir into the job's
# folder, which Hydra's default turns on only while no version_base is set. A pytest-xdist worker
# has run other tests first (pnn's own compose with version_base="1.3"), and the launcher hands
# Hydra's singletons to its job processes; in CI the jobs then stayed in the launch folder. Said
# explicitly, the cases no longer depend on which tests ran before them in the process.
CHDIR = ["hydra.job.chdir=True"]


@pytest.mark.parametrize("launcher_name, overrides", [("gpu_pool", [*GPU_POOL, *CHDIR])])
class TestGpuPoolLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize(
    "launcher_name, overrides",
    [("gpu_pool", [*GPU_POOL, *CHDIR, "hydra.sweeper.max_batch_size=2"])],
)
class TestGpuPoolLauncherInBatches(BatchedSweeperTestSuite):
    pass


@pytest.mark.parametrize(
    "task_launcher_cfg, extra_flags",
    [({}, ["-m", "hydra/job_logging=disabled", "hydra/launcher=gpu_pool", *GPU_POOL])],
)
class TestGpuPoolLauncherIntegration(IntegrationTestSuite):
    pass
