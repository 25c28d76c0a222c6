"""``hydra/launcher=slurm``: hydra-submitit-launcher's SLURM launcher, with each job's own end.

The submission is hydra-submitit-launcher's (one array, submitit's pickles and requeue). Around it:

- **in the job**, SIGTERM (``scancel``) reaches our handler, installed after submitit's (which
  only logs it), so the run ends KILLED within KillWait; before a preemption requeue the job
  releases its lease (:func:`pnn.sweep.lease.release`) so that the requeued job adopts the run
  at once; it writes ``<run id> <owner>`` into its submitit folder, for the sweep;
- **in the sweep**, every job is waited for and reported with its own outcome. A job has ended
  when ``squeue`` says so (no accounting needed); one without a result is lost, its run marked
  KILLED for the rerun. Ctrl-C or SIGTERM cancels the jobs; ``sweep.detach=true`` returns once
  they are submitted. hydra-submitit's ``launch`` raises at the first job without a result, so
  submitit's executor is wrapped for the time of one launch and its jobs' ``results()`` wait as
  described here and never raise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from omegaconf import OmegaConf

from pnn.sweep import interrupt
from pnn.sweep.outcomes import failed_return, is_pnn_sweep, stopped_return

log = logging.getLogger(__name__)

# Where a job writes "<run id> <owner>" (its submitit folder) once it leases its run.
RUN_FILE = "pnn_run"
# SLURM states in which a job may still run or run again (``squeue --states=all``); any other
# state, or a job SLURM no longer knows, is over.
ACTIVE = frozenset(
    "PENDING RUNNING REQUEUED REQUEUE_HOLD REQUEUE_FED CONFIGURING COMPLETING SUSPENDED STOPPED "
    "RESIZING SIGNALING STAGE_OUT RESV_DEL_HOLD PREEMPTED".split()
)
CANCEL_WAIT_S = 300.0


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    def __init__(self, poll_s: float = 10.0, result_wait_s: float = 15.0, **params: Any) -> None:
        super().__init__(**params)
        self.poll_s = float(poll_s)
        self.result_wait_s = float(result_wait_s)
        self._states: dict[str, str] = {}  # job id -> SLURM state
        self._squeue_failed = False
        self._polled = 0.0

    # ------------------------------------------------------------------------------------------
    # In the job
    # ------------------------------------------------------------------------------------------

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

    # ------------------------------------------------------------------------------------------
    # In the sweep
    # ------------------------------------------------------------------------------------------

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        self._states, self._polled = {}, 0.0
        jobs: list[Any] = []
        detach = bool(OmegaConf.select(self.config, "sweep.detach", default=False))
        launcher = self

        class Executor(submitit.AutoExecutor):
            def map_array(self, fn: Any, *iterable: Any) -> list[Any]:
                jobs.extend(super().map_array(fn, *iterable))
                if detach:
                    return [_Submitted(launcher, job) for job in jobs]
                return [_Watched(launcher, job) for job in jobs]

        try:
            with _replaced(submitit, "AutoExecutor", Executor):
                return super().launch(job_overrides, initial_job_idx)
        except _Signalled:
            return self._cancel(jobs, job_overrides, interrupt.signal_name() or "SIGINT")

    def _cancel(
        self, jobs: list[Any], job_overrides: Sequence[Sequence[str]], signal_name: str
    ) -> list[JobReturn]:
        """Cancel the jobs, wait for each to end (a running one marks its run KILLED), report."""
        pnn_jobs = is_pnn_sweep(self.config)
        if not jobs:
            why = f"not submitted: the sweep got {signal_name}"
            return [stopped_return(list(o), why, pnn_jobs) for o in job_overrides]
        ids = [job.job_id for job in jobs]
        log.info(f"[sweep] {signal_name}: cancelling SLURM job(s) {' '.join(ids)}")
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60)
        deadline = time.monotonic() + CANCEL_WAIT_S
        returns = []
        for job, overrides in zip(jobs, job_overrides, strict=True):
            while not self._ended(job) and time.monotonic() < deadline:
                time.sleep(min(self.poll_s, 1.0))
            ret = self._result(job, list(overrides))
            if ret is None and (job.paths.folder / RUN_FILE).exists():
                ret = self._lost(job, list(overrides))
            if ret is None:
                why = f"cancelled by the sweep ({signal_name}) before it started"
                ret = stopped_return(list(overrides), why, pnn_jobs)
            returns.append(ret)
        return returns

    def _wait(self, job: Any) -> JobReturn:
        overrides = list(job.submission().args[0])
        while not self._ended(job):
            if interrupt.received():  # Ctrl-C or SIGTERM to the sweep: cancel the jobs
                raise _Signalled
            time.sleep(min(self.poll_s, 1.0))
        ret = self._result(job, overrides)
        if ret is not None:
            return ret
        return self._lost(job, overrides)

    def _ended(self, job: Any) -> bool:
        """Whether the job has a result, or SLURM says it is over."""
        if job.paths.result_pickle.exists():
            return True
        if time.monotonic() - self._polled >= self.poll_s:
            self._poll()
        state = self._states.get(job.job_id, "")
        if self._squeue_failed:  # submitit's own watcher (sacct)
            return bool(job.done())
        return state not in ACTIVE

    def _poll(self) -> None:
        """One ``squeue`` for every job of this launch: the state of each."""
        self._polled = time.monotonic()
        cmd = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        self._squeue_failed = proc is None or proc.returncode != 0
        if self._squeue_failed:
            return
        states: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            job_id, _, state = line.partition("|")
            states[job_id.strip()] = state.strip()
        self._states = states

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

        state = self._states.get(job.job_id, "no longer known to SLURM")
        reason = (
            f"lost: SLURM job {job.job_id} ended ({state or 'no longer known to SLURM'}) without "
            f"a result (killed outright, out of memory, or its node failed?); log: "
            f"{job.paths.stderr}"
        )
        if not is_pnn_sweep(self.config):
            return failed_return(overrides, RuntimeError(reason))
        reason += "; rerun the same command to resume it"
        marked = mark_runs_killed(job.paths.folder / RUN_FILE, reason)
        reason += "".join(f"; run {r} marked KILLED" for r in marked)
        ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        ret._return_value = {
            "status": "lost",
            "name": " ".join(filter_overrides(overrides)),
            "reason": reason,
        }
        return ret


class _Signalled(Exception):
    """The sweep got SIGTERM or SIGINT while it waited for its jobs (pnn.sweep.interrupt)."""


class _Watched:
    """A submitit job whose ``results()`` waits as :class:`SlurmLauncher` does and never raises."""

    def __init__(self, launcher: SlurmLauncher, job: Any) -> None:
        self.launcher, self.job = launcher, job

    def results(self) -> list[JobReturn]:
        return [self.launcher._wait(self.job)]


class _Submitted(_Watched):
    """``sweep.detach=true``: the job is reported as submitted, not waited for."""

    def results(self) -> list[JobReturn]:
        overrides = list(self.job.submission().args[0])
        ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        ret._return_value = {
            "status": "submitted",
            "name": " ".join(filter_overrides(overrides)),
            "reason": f"SLURM job {self.job.job_id}",
            "slurm_job_id": self.job.job_id,
        }
        return [ret]


@contextlib.contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _run_lines(run_file: Path) -> list[tuple[str, str]]:
    try:
        lines = run_file.read_text().splitlines()
    except OSError:
        return []
    return [(run_id, owner) for run_id, _, owner in (line.partition(" ") for line in lines)]


def release_leases(run_file: Path) -> None:
    """Release the lease on the run this job claimed (the last line of ``run_file``)."""
    from pnn.io import storeguard
    from pnn.io.tracking import ENV_URI
    from pnn.sweep.lease import release

    lines = _run_lines(run_file)
    uri = os.environ.get(ENV_URI)
    if not lines or not uri:
        return
    run_id, owner = lines[-1]
    try:
        release(storeguard.client(uri), run_id, owner)
    except Exception as err:  # noqa: BLE001 - the lease then goes stale on its own
        log.warning(f"could not release the lease on run {run_id}: {err}")
