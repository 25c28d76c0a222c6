"""``hydra/launcher=gpu_pool``: parallel jobs on one machine, one GPU per job.

Every job runs in a Python process of its own whose ``CUDA_VISIBLE_DEVICES`` is set before the
process starts, so CUDA can only ever see the job's own GPU. pnn-sweep's jobs on CPU slots are
forked from a forkserver that has imported torch and MLflow (:mod:`pnn.sweep.forkserver`: forked
from the sweep, else started here); every other job process, GPU jobs included, starts afresh. A
slot is a (GPU, packing index) pair; a job holds its slot until its process exits, so no two jobs
share a GPU beyond ``jobs_per_gpu``, however many jobs a slot runs one after another. Without GPUs
the slots are ``cpu_workers`` CPU workers (``auto``: the cores this process may use divided by the
jobs' ``train.threads``); a job's thread count is its own ``train.threads``, never derived from the
number of workers, so that parallelism never changes a job's numbers.

With ``seeds_per_process`` K > 1, jobs that differ only in ``train.seed`` are grouped K at a
time into one job process that trains them together (:mod:`pnn.train.packing`); each stays its own
job with its own MLflow run and result.

A job process that dies (killed, out of memory) is reported as a failure with its exit code;
the other jobs go on; so does an exception in a launcher thread (a FAILED job with its reason).
The job processes ask the kernel to end them if this process dies, so a killed sweep leaves
nothing running; SIGTERM and SIGINT are forwarded to them (``pnn.sweep.interrupt``). The temporary
folder of job payloads is removed when the jobs are done.

It is a Hydra launcher plugin like any other (``hydra_plugins.pnn_plugins`` registers its config
in Hydra's ConfigStore), so any Hydra app can use it. What is pnn-sweep's own applies only to
pnn-sweep's jobs, those its sweeper launches (:func:`pnn.sweep.outcomes.is_pnn_sweep`): seed
packing, the run claim file, a stopped job reported as a KILLED outcome and a dead job's MLflow run
marked KILLED. Any other task's jobs report the Hydra way: COMPLETED with the return value, or
FAILED with the error (a signal's or a dead process's too), which Hydra's sweepers raise.

Hydra imports every plugin to discover them, in every app; so this module, and the job
processes of other apps, import neither torch nor MLflow: pnn-sweep's parts import them when
they run.
"""

from __future__ import annotations

import logging
import os
import queue
import reprlib
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import cloudpickle
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from pnn.sweep import interrupt
from pnn.sweep.forkserver import JOB_PRELOAD, ForkServer
from pnn.sweep.outcomes import failed_return, is_pnn_sweep, outcome_of, stopped_return
from pnn.sweep.slots import check_launcher_keys, make_slots

log = logging.getLogger(__name__)


def job_threads(sweep_config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> int:
    """The most ``train.threads`` any job asks for (1 where an app has no such key): the
    sweep's own value, or a job's override (a grid such as ``train.threads=1,2``), without
    composing every job's config."""
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
        self.gpus = list(gpus) if gpus is not None else None
        self.jobs_per_gpu = jobs_per_gpu
        self.cpu_workers = cpu_workers
        self.seeds_per_process = seeds_per_process
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.pnn_jobs = False  # pnn-sweep's jobs, launched by its sweeper (set by setup)
        # Set by pnn-sweep's sweeper: a forkserver forked from the sweep process, for its jobs.
        self.job_server: ForkServer | None = None

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
        pending: queue.Queue[list[int]] = queue.Queue()
        for group in groups:
            pending.put(group)
        results: list[JobReturn | None] = [None] * total
        done = [0]
        lock = threading.Lock()
        workdir = Path(tempfile.mkdtemp(prefix="pnn-launch-"))
        self._servers = _JobServers(self.job_server)

        def run(jobs: list[tuple[list[str], int]], slot: dict) -> list[JobReturn]:
            """The job process of ``jobs``: one JobReturn per job, whatever happens."""
            try:
                if interrupt.received():
                    raise interrupt.Interrupted(interrupt.received())
                rets = self._run_one(jobs, slot, workdir)
                if interrupt.received():
                    # Stopped by the forwarded signal before it could report.
                    why = f"by {interrupt.signal_name()}"
                    return [
                        self._stopped(ret.overrides, why) if ret.status == JobStatus.FAILED else ret
                        for ret in rets
                    ]
                return rets
            except interrupt.Interrupted as sig:
                why = f"not started: the sweep got {sig.signal_name}"
                return [self._stopped(overrides, why) for overrides, _ in jobs]
            except Exception as err:  # a job is never lost: it becomes a FAILED one
                first = jobs[0][1]
                log.error(f"{tag} job #{first} could not be run: {type(err).__name__}: {err}")
                why = f"the launcher could not run it ({type(err).__name__}: {err})"
                return [failed_return(overrides, RuntimeError(why)) for overrides, _ in jobs]

        def worker(slot: dict) -> None:
            while True:
                try:
                    group = pending.get_nowait()
                except queue.Empty:
                    return
                jobs = [(list(job_overrides[i]), initial_job_idx + i) for i in group]
                if not interrupt.received():
                    for overrides, idx in jobs:
                        name = " ".join(filter_overrides(overrides))
                        log.info(f"{tag} job #{idx} starting on {slot['PNN_SLOT']}: {name}")
                rets = run(jobs, slot)
                for i, ret, (overrides, idx) in zip(group, rets, jobs, strict=True):
                    results[i] = ret
                    name = " ".join(filter_overrides(overrides))
                    with lock:
                        done[0] += 1
                        progress = f"{done[0]}/{total} jobs done"
                        status = self._status(ret, overrides)
                        log.info(f"{tag} {progress}; job #{idx} {status}: {name}")

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in slots]
        try:
            for t in threads:
                t.start()
            for t in threads:
                # Never one unbounded join: a signal that the kernel handed to a worker thread
                # leaves the main thread asleep in it, and only the main thread runs handlers
                # (Ctrl-C then waited for every running job to end).
                while t.is_alive():
                    t.join(timeout=0.1)
        finally:
            self._servers.close()
            shutil.rmtree(workdir, ignore_errors=True)
        return [
            r if r is not None else self._stopped(list(job_overrides[i]), "not started")
            for i, r in enumerate(results)
        ]

    def _groups(self, job_overrides: Sequence[Sequence[str]]) -> list[list[int]]:
        """The jobs each job process runs, as indices: pnn-sweep's seeds packed, else one."""
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
        """A finished job, for the log: pnn-sweep's outcome, or what a Hydra task returned."""
        value = ret._return_value
        if self.pnn_jobs:
            return outcome_of(ret, overrides)["status"]
        if ret.status == JobStatus.FAILED:
            return f"FAILED ({type(value).__name__}: {value})"
        return f"completed, returned {reprlib.repr(value)}"

    def _stopped(self, overrides: list[str], reason: str) -> JobReturn:
        return stopped_return(overrides, reason, pnn_jobs=self.pnn_jobs)

    def _run_one(
        self, jobs: list[tuple[list[str], int]], slot: dict, workdir: Path
    ) -> list[JobReturn]:
        """One job process for ``jobs`` ((overrides, index) pairs; several when packed)."""
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
        result = workdir / f"job{idx}.result.pkl"
        payload.write_bytes(
            cloudpickle.dumps(
                {
                    "hydra_context": self.hydra_context,
                    "task_function": self.task_function,
                    "configs": configs,
                    "singleton_state": Singleton.get_state(),
                    "pnn_jobs": self.pnn_jobs,
                }
            )
        )
        env = dict(os.environ)
        env.update(slot)
        env["PYTHONPATH"] = child_pythonpath()
        run_ids = workdir / f"job{idx}.run"
        if self.pnn_jobs:
            from pnn.io.tracking import ENV_RUN_ID_FILE  # imports MLflow: pnn-sweep's jobs only

            env[ENV_RUN_ID_FILE] = str(run_ids)  # the job writes "<run id> <owner>" once it claims
        argv = ["-m", "pnn.sweep.launch_child", str(payload), str(result)]
        # pnn-sweep's jobs on CPU slots fork from a server that has imported torch and MLflow.
        server = (
            self._servers.get(env) if self.pnn_jobs and slot["CUDA_VISIBLE_DEVICES"] == "" else None
        )
        if server is not None:
            proc = interrupt.run_process(lambda: server.start(argv, env))
        else:
            proc = interrupt.run_process(lambda: subprocess.Popen([sys.executable, *argv], env=env))
        payload.unlink(missing_ok=True)
        if result.exists():
            rets = cloudpickle.loads(result.read_bytes())
            result.unlink()
            run_ids.unlink(missing_ok=True)
            return rets
        code: int | str = proc.returncode
        if proc.returncode < 0 and -proc.returncode in signal.valid_signals():
            code = f"{proc.returncode} ({signal.Signals(-proc.returncode).name})"
        reason = f"job process exited with code {code} before reporting (killed, or out of memory?)"
        if self.pnn_jobs:
            reason += "; rerun the same command to resume it"
            reason += "".join(f"; run {r} marked KILLED" for r in mark_runs_killed(run_ids, reason))
        return [failed_return(o, RuntimeError(reason)) for o, _ in jobs]


class _JobServers:
    """The forkserver of one launch's pnn-sweep jobs on CPU slots (:mod:`pnn.sweep.forkserver`):
    the one the sweeper forked from the sweep process, or else one started with the first of
    them. Should that fail to start, each job process starts afresh."""

    def __init__(self, given: ForkServer | None = None) -> None:
        self._lock = threading.Lock()
        self._given = given  # the sweeper's, which it ends itself
        self._server: ForkServer | None = None
        self._failed = False

    def get(self, env: dict[str, str]) -> ForkServer | None:
        """The server for a job process with environment ``env``; None if it must start afresh
        (the server could not start, or ``env`` changes what only a new interpreter reads)."""
        if self._given is not None and not self._given.startup_differences(env):
            return self._given
        with self._lock:
            if self._server is None and not self._failed:
                server_env = dict(os.environ)  # what the slots add is read after the start
                for key in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES"):
                    server_env[key] = env[key]
                try:
                    self._server = ForkServer(JOB_PRELOAD, server_env)
                except OSError as err:
                    self._failed = True
                    log.warning(f"[sweep] job processes start afresh: {err}")
            server = self._server
        if server is None or server.startup_differences(env):
            return None
        return server

    def close(self) -> None:
        with self._lock:
            if self._server is not None:
                self._server.close()
                self._server = None


def child_pythonpath() -> str:
    """This process's import path, for a job process, so that what the task refers to (the
    app's modules beside its script, this package) imports there as it does here. The
    interpreter's own folders are left out: the job process has them anyway, after these."""
    own = [Path(p) for p in {sys.prefix, sys.base_prefix, sys.exec_prefix}]
    user_site = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    paths = [
        p
        for p in sys.path
        if p
        and p != user_site
        and Path(p).is_dir()
        and not any(Path(p).is_relative_to(prefix) for prefix in own)
    ]
    return os.pathsep.join(dict.fromkeys(paths))


def mark_runs_killed(run_ids: Path, reason: str) -> list[str]:
    """Mark KILLED the runs a dead job process had claimed (listed in ``run_ids``), unless
    another process has adopted them since. The ids of the runs marked."""
    from pnn.io.tracking import ENV_URI

    if not run_ids.exists() or not os.environ.get(ENV_URI):
        return []

    from pnn.io import storeguard
    from pnn.sweep.claim import mark_killed

    try:
        client = storeguard.client(os.environ[ENV_URI])
    except storeguard.StoreError as err:
        log.warning(f"[sweep] could not mark the dead job's runs KILLED: {err}")
        return []
    marked = []
    for line in run_ids.read_text().splitlines():
        run_id, _, owner = line.partition(" ")
        try:
            if mark_killed(client, run_id, reason, owner=owner or None):
                marked.append(run_id)
        except Exception as err:  # noqa: BLE001 - the store may be what failed
            log.warning(f"[sweep] could not mark run {run_id} KILLED: {err}")
    run_ids.unlink(missing_ok=True)
    return marked


def run_child(payload_path: str, result_path: str) -> None:
    """Body of a job process (see ``pnn.sweep.launch_child``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals

    payload = cloudpickle.loads(Path(payload_path).read_bytes())
    setup_globals()
    Singleton.set_state(payload["singleton_state"])
    pnn_jobs = payload["pnn_jobs"]

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
        except interrupt.Interrupted as sig:  # a pnn-sweep job marked its run KILLED
            ret = stopped_return(overrides, f"by {sig.signal_name}", pnn_jobs=pnn_jobs)
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


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the launcher dies, so no orphan keeps training."""
    if sys.platform != "linux":
        return
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
