"""Hydra's own launcher test suites, run on ``hydra/launcher=gpu_pool`` as Hydra's official
launcher plugins (joblib, submitit, ray) run them on themselves.

The suites come with hydra-core (``hydra.test_utils``): ``LauncherTestSuite`` sweeps
``hydra.test_utils.a_module`` in this process, ``IntegrationTestSuite`` writes its own
``task.py`` and runs it with ``python task.py -m``, ``BatchedSweeperTestSuite`` runs the basic
sweeper in batches. Nothing is copied into this repository. pnn-sweep's own sweeper is not run
on them: it sweeps pnn's jobs only, so its config is not registered for other apps.

Without GPUs two CPU workers run the jobs; every job starts a process, so these are slow.
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
# folder, which Hydra turns on by default only while no version_base is set; an xdist worker may
# have composed with version_base="1.3" first, and the launcher hands Hydra's singletons to its
# job processes. Said explicitly, the cases do not depend on which tests ran before them.
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
