"""``hydra/launcher=gpu_pool``: parallel jobs on one machine, one GPU (or CPU worker) slot per job.

Each job runs in a process of the stdlib forkserver (:func:`job_context`), which has imported
torch and MLflow once for pnn-sweep's jobs; with ``seeds_per_process`` K seeds of one config
share a process (:mod:`pnn.train.packing`). A job process that dies is a FAILED job. Any Hydra
app can use it (docs/launchers.md), so it imports neither torch nor MLflow itself."""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.util
import os
import reprlib
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Sequence
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from pnn.sweep import interrupt
from pnn.sweep.outcomes import failed_return, is_pnn_sweep, outcome_of, stopped_return
from pnn.sweep.slots import check_gpus_visible, check_launcher_keys, make_slots

log = logging.getLogger(__name__)


def job_threads(sweep_config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> int:
    """The most ``train.threads`` any job asks for (1 where an app has no such key), read from the
    sweep's config and the jobs' overrides without composing each job's config."""
    threads = [int(OmegaConf.select(sweep_config, "train.threads", default=1))]
    for overrides in job_overrides:
        for override in overrides:
            key, _, value = override.partition("=")
            if key.lstrip("+~") == "train.threads" and value.isdigit():
                threads.append(int(value))
    return max(threads)


class GpuPoolLauncher(Launcher):
    def __init__(
        self,
        gpus: list[int] | None = None,
        jobs_per_gpu: int = 1,
        cpu_workers: int | str = "auto",
        seeds_per_process: int = 1,
    ) -> None:
        check_launcher_keys(gpus, jobs_per_gpu, cpu_workers, seeds_per_process)
        if gpus:
            check_gpus_visible(gpus)
        self.gpus = list(gpus) if gpus is not None else None
        self.jobs_per_gpu = jobs_per_gpu
        self.cpu_workers = cpu_workers
        self.seeds_per_process = seeds_per_process
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.pnn_jobs = False  # pnn-sweep's jobs, launched by its sweeper

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.pnn_jobs = is_pnn_sweep(config)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        auto = self.cpu_workers == "auto"
        threads = job_threads(self.config, job_overrides) if auto else 1
        slots = make_slots(self.gpus, self.jobs_per_gpu, self.cpu_workers, threads)
        total = len(job_overrides)
        where = "GPU" if slots[0]["CUDA_VISIBLE_DEVICES"] else "CPU"
        groups = self._groups(job_overrides)
        packed = f" in {len(groups)} process(es)" if len(groups) < total else ""
        tag = self._tag()
        how = f" (cpu_workers=auto, {threads} thread(s) a job)" if auto and where == "CPU" else ""
        log.info(f"{tag} launching {total} job(s){packed} on {len(slots)} {where} slot(s){how}")
        context = job_context(self.pnn_jobs)
        pending = deque(groups)
        free = list(slots)
        running: dict[Any, tuple[Any, list[int], list[tuple[list[str], int]], dict]] = {}
        results: list[JobReturn | None] = [None] * total
        with tempfile.TemporaryDirectory(prefix="pnn-launch-") as tmp:
            workdir = Path(tmp)
            while pending or running:
                while pending and free and not interrupt.received():
                    group, slot = pending.popleft(), free.pop(0)
                    jobs = [(list(job_overrides[i]), initial_job_idx + i) for i in group]
                    for overrides, idx in jobs:
                        name = " ".join(filter_overrides(overrides))
                        log.info(f"{tag} job #{idx} starting on {slot['PNN_SLOT']}: {name}")
                    try:
                        proc = self._start(context, jobs, slot, workdir)
                    except Exception as err:  # a job is never lost: it becomes a FAILED one
                        why = f"the launcher could not run it ({type(err).__name__}: {err})"
                        log.error(f"{tag} job #{jobs[0][1]} could not be run: {why}")
                        rets = [failed_return(o, RuntimeError(why)) for o, _ in jobs]
                        self._report(group, rets, jobs, results)
                        free.append(slot)
                        continue
                    running[proc.sentinel] = (proc, group, jobs, slot)
                if not running:
                    break
                for sentinel in wait(list(running)):
                    proc, group, jobs, slot = running.pop(sentinel)
                    proc.join()
                    interrupt.job_pids.discard(proc.pid)
                    self._report(group, self._collect(proc, jobs, workdir), jobs, results)
                    free.append(slot)
        signame = interrupt.signal_name()
        return [
            r
            if r is not None
            else stopped_return(
                list(job_overrides[i]), f"not started: the sweep got {signame}", self.pnn_jobs
            )
            for i, r in enumerate(results)
        ]

    def _report(
        self,
        group: list[int],
        rets: list[JobReturn],
        jobs: list[tuple[list[str], int]],
        results: list[JobReturn | None],
    ) -> None:
        for i, ret, (overrides, idx) in zip(group, rets, jobs, strict=True):
            results[i] = ret
            done = sum(r is not None for r in results)
            name = " ".join(filter_overrides(overrides))
            status = self._status(ret, overrides)
            log.info(f"{self._tag()} {done}/{len(results)} jobs done; job #{idx} {status}: {name}")

    def _groups(self, job_overrides: Sequence[Sequence[str]]) -> list[list[int]]:
        """The jobs each job process runs, as indices: pnn-sweep's seeds packed, else one each."""
        if self.pnn_jobs:
            from pnn.train.packing import group_seeds  # imports torch: pnn-sweep's jobs only

            return group_seeds(job_overrides, self.seeds_per_process)
        if self.seeds_per_process > 1:
            log.warning(
                f"{self._tag()} hydra.launcher.seeds_per_process applies to pnn-sweep's jobs "
                "only; here each job runs in a process of its own"
            )
        return [[i] for i in range(len(job_overrides))]

    def _tag(self) -> str:
        return "[sweep]" if self.pnn_jobs else "[gpu_pool]"

    def _status(self, ret: JobReturn, overrides: list[str]) -> str:
        """A finished job for the log: pnn-sweep's outcome, or what a Hydra task returned."""
        value = ret._return_value
        if self.pnn_jobs:
            return outcome_of(ret, overrides)["status"]
        if ret.status == JobStatus.FAILED:
            return f"FAILED ({type(value).__name__}: {value})"
        return f"completed, returned {reprlib.repr(value)}"

    def _start(
        self, context: Any, jobs: list[tuple[list[str], int]], slot: dict, workdir: Path
    ) -> Any:
        """Start the job process of ``jobs`` ((overrides, index) pairs; several when packed)."""
        assert self.config is not None and self.hydra_context is not None
        configs = []
        for overrides, idx in jobs:
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, overrides
            )
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            configs.append(sweep_config)
        idx = jobs[0][1]
        payload = workdir / f"job{idx}.pkl"
        state = {
            "hydra_context": self.hydra_context,
            "task_function": self.task_function,
            "configs": configs,
            "singleton_state": Singleton.get_state(),
            "pnn_jobs": self.pnn_jobs,
        }
        payload.write_bytes(cloudpickle.dumps(state))
        env = {**os.environ, **slot}
        if self.pnn_jobs:
            from pnn.io.tracking import ENV_RUN_ID_FILE  # imports MLflow: pnn-sweep's jobs only

            env[ENV_RUN_ID_FILE] = str(workdir / f"job{idx}.run")  # "<run id> <owner>" lines
        args = (
            str(payload),
            str(workdir / f"job{idx}.result.pkl"),
            env,
            os.getcwd(),
            self.pnn_jobs,
        )
        proc = context.Process(target=job_process, args=args, name=f"job{idx}", daemon=False)
        proc.start()
        interrupt.job_pids.add(proc.pid)
        return proc

    def _collect(
        self, proc: Any, jobs: list[tuple[list[str], int]], workdir: Path
    ) -> list[JobReturn]:
        """What the ended job process reported, or why it reported nothing."""
        idx = jobs[0][1]
        result = workdir / f"job{idx}.result.pkl"
        if result.exists():
            rets = cloudpickle.loads(result.read_bytes())
            if interrupt.received():  # a job stopped by the forwarded signal before it reported
                why = f"by {interrupt.signal_name()}"
                rets = [
                    stopped_return(r.overrides, why, self.pnn_jobs)
                    if r.status == JobStatus.FAILED
                    else r
                    for r in rets
                ]
            return rets
        code, stopped_by = proc.exitcode, STOPPED_BY.get(proc.exitcode)
        if stopped_by:  # SIGTERM or SIGINT ended it before it reported
            reason = f"by {signal.Signals(stopped_by).name}"
        else:
            name = f" ({signal.Signals(-code).name})" if -code in signal.valid_signals() else ""
            reason = f"job process exited with code {code}{name} before reporting"
            reason += " (killed, or out of memory?)"
        if self.pnn_jobs:
            reason += "" if stopped_by else "; rerun the same command to resume it"
            marked = mark_runs_killed(workdir / f"job{idx}.run", reason)
            reason += "".join(f"; run {r} marked KILLED" for r in marked)
        if stopped_by:
            return [stopped_return(o, reason, self.pnn_jobs) for o, _ in jobs]
        return [failed_return(o, RuntimeError(reason)) for o, _ in jobs]


# A job process's exit code when SIGTERM or SIGINT ended it: killed by it, or exiting 128 + it.
STOPPED_BY = {code: sig for sig in interrupt.SIGNALS for code in (-sig, 128 + sig)}

# What a pnn-sweep job imports before its first line of work.
JOB_PRELOAD = [
    "torch",
    "torch._dynamo",
    "torch.optim",
    "mlflow",
    "mlflow.tracking",
    "mlflow.store.tracking.sqlalchemy_store",
    "hydra.core.utils",
    "omegaconf",
    "cloudpickle",
]


# The forkserver's socket is in multiprocessing's temp folder, and a socket's path has at most 107
# bytes: under a longer TMPDIR (a cluster job's, say) Python < 3.13 would fail every job.
LONGEST_TMPDIR = 60


def job_context(pnn_jobs: bool) -> Any:
    """The stdlib forkserver context of the job processes (:mod:`pnn.sweep.forkserver_preload`);
    for pnn-sweep's jobs its server has imported :data:`JOB_PRELOAD` once."""
    context = multiprocessing.get_context("forkserver")
    if len(tempfile.gettempdir()) > LONGEST_TMPDIR:
        saved, tempfile.tempdir = tempfile.tempdir, "/tmp"
        try:
            multiprocessing.util.get_temp_dir()  # made once per process, then reused
        finally:
            tempfile.tempdir = saved
    preload = ["pnn.sweep.forkserver_preload", *(JOB_PRELOAD if pnn_jobs else [])]
    context.set_forkserver_preload(preload)
    return context


def job_process(payload: str, result: str, env: dict[str, str], cwd: str, pnn_jobs: bool) -> None:
    """A job process: the slot's environment, the sweep's folder, its signals, then its job(s)."""
    if pnn_jobs:
        interrupt.install(role="job")
    else:  # Python's default (the server ignores SIGTERM)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    die_with_parent()
    run_child(payload, result)
    if interrupt.received():  # the job reported being stopped by a signal: say so
        sys.exit(128 + interrupt.received())


def mark_runs_killed(run_ids: Path, reason: str) -> list[str]:
    """Mark KILLED the runs a dead job process had leased (listed in ``run_ids``), unless another
    process has adopted them since; the ids of those marked."""
    from pnn.sweep.lease import end_leases, mark_killed

    marked = end_leases(
        run_ids, lambda client, run_id, owner: mark_killed(client, run_id, reason, owner or None)
    )
    run_ids.unlink(missing_ok=True)
    return marked


def run_child(payload_path: str, result_path: str) -> None:
    """Run the job(s) of ``payload_path`` and write their JobReturns to ``result_path``."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals

    payload = cloudpickle.loads(Path(payload_path).read_bytes())
    setup_globals()
    Singleton.set_state(payload["singleton_state"])

    def one_job(config: DictConfig) -> JobReturn:
        HydraConfig.instance().set_config(config)
        overrides = list(config.hydra.overrides.task)
        try:
            ret = run_job(
                hydra_context=payload["hydra_context"],
                task_function=payload["task_function"],
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        except Exception as err:  # Hydra's own setup failed: report it, as a task error is
            ret = failed_return(overrides, err)
        if ret.status == JobStatus.FAILED and not _picklable(ret._return_value):
            ret._return_value = RuntimeError(repr(ret._return_value))
        return ret

    configs = payload["configs"]
    if len(configs) == 1:
        rets = [one_job(configs[0])]
    else:
        from pnn.train.packing import run_packed  # imports torch: only pnn-sweep's seeds are packed

        rets = run_packed(one_job, configs)
    tmp = Path(result_path + ".tmp")
    try:
        tmp.write_bytes(cloudpickle.dumps(rets))
    except FileNotFoundError:  # the launcher is gone (a signal ended it) and took its folder
        return
    os.replace(tmp, result_path)


def _picklable(value: object) -> bool:
    try:
        cloudpickle.dumps(value)
        return True
    except Exception:
        return False


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies: no orphan keeps training."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, sig)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
