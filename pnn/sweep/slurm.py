"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, with each job's own end.

hydra-submitit submits the jobs (one array, submitit's pickles and requeue). In the job, SIGTERM
(``scancel``) reaches our handler, so the run ends KILLED within KillWait; before a preemption
requeue the job releases its lease, for the requeued job to adopt. The sweep waits for each job
itself, as ``squeue`` sees it (no accounting needed), since hydra-submitit's ``launch`` would
raise at the first job without a result. A job that ended without one is lost, its run marked
KILLED. Ctrl-C or SIGTERM cancels the jobs; ``sweep.detach=true`` returns once they are submitted.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import OmegaConf

from pnn.sweep import interrupt
from pnn.sweep.outcomes import failed_return, is_pnn_sweep, outcome_return, stopped_return

log = logging.getLogger(__name__)

# Where a job writes "<run id> <owner>" (its submitit folder) once it leases its run.
RUN_FILE = "pnn_run"
# SLURM states in which a job may still run or run again (``squeue --states=all``); any other
# state, or a job SLURM no longer knows, is over.
ACTIVE = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_HOLD REQUEUE_FED CONFIGURING COMPLETING SUSPENDED STOPPED "
    "RESIZING SIGNALING STAGE_OUT RESV_DEL_HOLD PREEMPTED".split()
)


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def __init__(self, poll_s: float = 10.0, result_wait_s: float = 15.0, **params: Any) -> None:
        super().__init__(**params)
        self.poll_s = float(poll_s)
        self.result_wait_s = float(result_wait_s)
        self._states: dict[str, str] | None = {}  # job id -> SLURM state; None: squeue failed
        self._polled = 0.0

    def __call__(
        self,
        sweep_overrides: list[str],
        job_dir_key: str,
        job_num: int,
        job_id: str,
        singleton_state: dict,
    ) -> JobReturn:
        import submitit

        from pnn.io.tracking import ENV_RUN_ID_FILE

        interrupt.install(role="job")  # after submitit's handlers, which bypass SIGTERM
        run_file = submitit.JobEnvironment().paths.folder / RUN_FILE
        os.environ[ENV_RUN_ID_FILE] = str(run_file)
        try:  # a pnn-sweep job stopped by the signal has marked its run KILLED and says so
            return super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        except SystemExit:  # submitit's requeue (preemption, time limit) ends this process
            release_leases(run_file)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit's USR2 handler before it runs ``scontrol requeue``. The SIGTERM
        that SLURM then sends the job is not a kill: ignored here and by ``scontrol`` (which
        inherits SIG_IGN), so the requeue completes and the run stays open for the requeued job."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return super().checkpoint(*args, **kwargs)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        from unittest import mock  # here, not at import: Hydra imports plugins in every app

        import submitit

        self._states, self._polled = {}, 0.0  # each launch (batch) polls squeue afresh
        jobs: list[Any] = []

        class Executor(submitit.AutoExecutor):
            def map_array(self, fn: Any, *iterable: Any) -> list[Any]:
                jobs.extend(super().map_array(fn, *iterable))
                return []  # nothing for hydra-submitit's launch to wait on

        with mock.patch.object(submitit, "AutoExecutor", Executor):
            super().launch(job_overrides, initial_job_idx)
        if OmegaConf.select(self.config, "sweep.detach", default=False):
            return [_submitted(job) for job in jobs]
        return self._wait(jobs)

    def _wait(self, jobs: list[Any]) -> list[JobReturn]:
        """Wait for each job to end and report it. Ctrl-C or SIGTERM cancels them all; each is
        still waited for (a running one marks its run KILLED; SLURM kills it after KillWait)."""
        returns: list[JobReturn] = []
        cancelled = False
        for job in jobs:
            overrides = list(job.submission().args[0])
            while not self._ended(job):
                if interrupt.received() and not cancelled:
                    ids = " ".join(j.job_id for j in jobs)
                    log.info(f"[sweep] {interrupt.signal_name()}: cancelling SLURM job(s) {ids}")
                    subprocess.run(["scancel", *ids.split()], capture_output=True, timeout=60)
                    cancelled = True
                time.sleep(min(self.poll_s, 1.0))
            ret = self._result(job, overrides)
            if ret is None and cancelled and not (job.paths.folder / RUN_FILE).exists():
                why = f"cancelled by the sweep ({interrupt.signal_name()}) before it started"
                ret = stopped_return(overrides, why, is_pnn_sweep(self.config))
            returns.append(ret or self._lost(job, overrides))
        return returns

    def _ended(self, job: Any) -> bool:
        """Whether the job has a result, or SLURM says it is over."""
        if job.paths.result_pickle.exists():
            return True
        if time.monotonic() - self._polled >= self.poll_s:
            self._poll()
        if self._states is None:  # squeue failed: submitit's own watcher (sacct)
            return bool(job.done())
        return self._states.get(job.job_id) not in ACTIVE

    def _poll(self) -> None:
        """One ``squeue`` for every job of this launch."""
        self._polled = time.monotonic()
        cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i %T"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True)
        except (OSError, subprocess.SubprocessError):
            self._states = None
            return
        self._states = dict(line.split() for line in proc.stdout.splitlines())

    def _result(self, job: Any, overrides: list[str]) -> JobReturn | None:
        """The job's result, waiting up to ``result_wait_s`` for a shared file system; a job
        that raised becomes a FAILED return. None if it left no result."""
        path = job.paths.result_pickle
        deadline = time.monotonic() + self.result_wait_s
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not path.exists():
            return None
        from submitit.core.utils import pickle_load

        outcome, value = pickle_load(path)
        if outcome == "success":
            return value
        last = str(value).strip().splitlines()[-1:] or ["no traceback"]
        why = f"SLURM job {job.job_id} raised {last[0]} (log: {job.paths.stderr})"
        return failed_return(overrides, RuntimeError(why))

    def _lost(self, job: Any, overrides: list[str]) -> JobReturn:
        """A job that ended without a result: killed outright, out of memory, its node gone."""
        from pnn.sweep.launcher import mark_runs_killed

        state = (self._states or {}).get(job.job_id) or "no longer known to SLURM"
        reason = (
            f"lost: SLURM job {job.job_id} ended ({state}) without a result (killed outright, "
            f"out of memory, or its node failed?); log: {job.paths.stderr}"
        )
        if not is_pnn_sweep(self.config):
            return failed_return(overrides, RuntimeError(reason))
        reason += "; rerun the same command to resume it"
        marked = mark_runs_killed(job.paths.folder / RUN_FILE, reason)
        reason += "".join(f"; run {r} marked KILLED" for r in marked)
        return outcome_return(overrides, "lost", reason)


def _submitted(job: Any) -> JobReturn:
    """``sweep.detach=true``: the job is reported as submitted, not waited for."""
    overrides = list(job.submission().args[0])
    return outcome_return(
        overrides, "submitted", f"SLURM job {job.job_id}", slurm_job_id=job.job_id
    )


def release_leases(run_file: Path) -> None:
    """Release the job's leases on the runs in ``run_file`` (earlier incarnations' are not held)."""
    from pnn.sweep.lease import end_leases, release

    end_leases(run_file, release)
