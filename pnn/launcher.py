"""``hydra/launcher=gpu_pool``: parallel jobs on one machine, one GPU per job.

Every job runs in a fresh Python process whose ``CUDA_VISIBLE_DEVICES`` is set before the
process starts, so CUDA can only ever see the job's own GPU. A slot is a (GPU, packing index)
pair; a job holds its slot until its process exits, so no two jobs share a GPU beyond
``jobs_per_gpu``, however many jobs a slot runs one after another. Without GPUs the slots are
``cpu_workers`` CPU workers; a job's thread count is its own ``train.threads``, never derived
from the number of workers, so that parallelism never changes a job's numbers.

With ``seeds_per_process`` K > 1, jobs that differ only in ``train.seed`` are grouped K at a
time into one job process that trains them together (:mod:`pnn.packing`); each stays its own
job with its own MLflow run and result.

A job process that dies (killed, out of memory) is reported as a failure with its exit code;
the other jobs go on; so does an exception in a launcher thread (a FAILED job with its reason).
The job processes ask the kernel to end them if this process dies, so a killed sweep leaves
nothing running; SIGTERM and SIGINT are forwarded to them (``pnn.interrupt``). The temporary
folder of job payloads is removed when the jobs are done.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
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
from omegaconf import DictConfig, open_dict

from pnn import interrupt
from pnn.config import ConfigError
from pnn.packing import group_seeds, run_packed
from pnn.sweeper import outcome_of
from pnn.tracking import ENV_RUN_ID_FILE, ENV_URI

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parent.parent


def visible_gpus() -> list[str]:
    """GPU ids this process may hand out, without creating a CUDA context here."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:  # no usable torch/CUDA: CPU only
        return []


def make_slots(gpus: Sequence[int | str] | None, jobs_per_gpu: int, cpu_workers: int) -> list[dict]:
    """Each slot is the environment one job process runs with."""
    check_launcher_keys(gpus, jobs_per_gpu, cpu_workers)
    ids = [str(g) for g in gpus] if gpus is not None else visible_gpus()
    if ids:
        return [
            {"CUDA_VISIBLE_DEVICES": gpu, "PNN_SLOT": f"gpu{gpu}.{k}"}
            for k in range(jobs_per_gpu)
            for gpu in ids
        ]
    return [{"CUDA_VISIBLE_DEVICES": "", "PNN_SLOT": f"cpu{k}"} for k in range(cpu_workers)]


def check_launcher_keys(
    gpus: object, jobs_per_gpu: object, cpu_workers: object, seeds_per_process: object = 1
) -> None:
    """The gpu_pool keys, checked by the sweeper before the parent run exists."""
    counts = (
        ("jobs_per_gpu", jobs_per_gpu),
        ("cpu_workers", cpu_workers),
        ("seeds_per_process", seeds_per_process),
    )
    for key, value in counts:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"hydra.launcher.{key} must be >= 1, a whole number (got {value!r})")
    if gpus is None:
        return
    ids = [gpus] if isinstance(gpus, int | str) else gpus
    try:
        ok = all(int(str(g)) >= 0 for g in ids)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            "hydra.launcher.gpus must be null (every visible GPU), [] (none: CPU workers) or a "
            f"list of GPU indices >= 0, e.g. '[0,1]' (got {gpus!r})"
        )


class GpuPoolLauncher(Launcher):
    def __init__(
        self,
        gpus: list[int] | None = None,
        jobs_per_gpu: int = 1,
        cpu_workers: int = 1,
        seeds_per_process: int = 1,
    ) -> None:
        self.gpus = list(gpus) if gpus is not None else None
        self.jobs_per_gpu = jobs_per_gpu
        self.cpu_workers = cpu_workers
        self.seeds_per_process = seeds_per_process
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        slots = make_slots(self.gpus, self.jobs_per_gpu, self.cpu_workers)
        total = len(job_overrides)
        where = "GPU" if slots[0]["CUDA_VISIBLE_DEVICES"] else "CPU"
        groups = group_seeds(job_overrides, self.seeds_per_process)
        packed = f" in {len(groups)} process(es)" if len(groups) < total else ""
        log.info(f"[sweep] launching {total} job(s){packed} on {len(slots)} {where} slot(s)")
        pending: queue.Queue[list[int]] = queue.Queue()
        for group in groups:
            pending.put(group)
        results: list[JobReturn | None] = [None] * total
        done = [0]
        lock = threading.Lock()
        workdir = Path(tempfile.mkdtemp(prefix="pnn-launch-"))

        def run(jobs: list[tuple[list[str], int]], slot: dict) -> list[JobReturn]:
            """The job process of ``jobs``: one JobReturn per job, whatever happens."""
            try:
                if interrupt.received():
                    raise interrupt.Interrupted(interrupt.received())
                rets = self._run_one(jobs, slot, workdir)
                if interrupt.received():
                    # Stopped by the forwarded signal before it could report.
                    why = f"by {interrupt.signal_name()}"
                    rets = [
                        killed_return(ret.overrides, why) if ret.status == JobStatus.FAILED else ret
                        for ret in rets
                    ]
                return rets
            except interrupt.Interrupted as sig:
                why = f"not started: the sweep got {sig.signal_name}"
                return [killed_return(overrides, why) for overrides, _ in jobs]
            except Exception as err:  # a job is never lost: it becomes a FAILED one
                first = jobs[0][1]
                log.error(f"[sweep] job #{first} could not be run: {type(err).__name__}: {err}")
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
                        log.info(f"[sweep] job #{idx} starting on {slot['PNN_SLOT']}: {name}")
                rets = run(jobs, slot)
                for i, ret, (overrides, idx) in zip(group, rets, jobs, strict=True):
                    results[i] = ret
                    name = " ".join(filter_overrides(overrides))
                    with lock:
                        done[0] += 1
                        status = outcome_of(ret, overrides)["status"]
                        progress = f"{done[0]}/{total} jobs done"
                        log.info(f"[sweep] {progress}; job #{idx} {status}: {name}")

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in slots]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return [
            r if r is not None else killed_return(list(job_overrides[i]), "not started")
            for i, r in enumerate(results)
        ]

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
                }
            )
        )
        env = dict(os.environ)
        env.update(slot)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        run_ids = workdir / f"job{idx}.run"
        env[ENV_RUN_ID_FILE] = str(run_ids)  # the job writes "<run id> <owner>" once it claims
        cmd = [sys.executable, "-m", "pnn.launch_child", str(payload), str(result)]
        proc = interrupt.run_process(cmd, env)
        payload.unlink(missing_ok=True)
        if result.exists():
            rets = cloudpickle.loads(result.read_bytes())
            result.unlink()
            run_ids.unlink(missing_ok=True)
            return rets
        code: int | str = proc.returncode
        if proc.returncode < 0 and -proc.returncode in signal.valid_signals():
            code = f"{proc.returncode} ({signal.Signals(-proc.returncode).name})"
        reason = (
            f"job process exited with code {code} before reporting (killed, or out of "
            "memory?); rerun the same command to resume it"
        )
        marked_note = "".join(f"; run {r} marked KILLED" for r in mark_runs_killed(run_ids, reason))
        return [failed_return(o, RuntimeError(reason + marked_note)) for o, _ in jobs]


def mark_runs_killed(run_ids: Path, reason: str) -> list[str]:
    """Mark KILLED the runs a dead job process had claimed (listed in ``run_ids``), unless
    another process has adopted them since. The ids of the runs marked."""
    if not run_ids.exists() or not os.environ.get(ENV_URI):
        return []

    from pnn import storeguard
    from pnn.claim import mark_killed

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
    """Body of a job process (see ``pnn.launch_child``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.utils import run_job, setup_globals

    payload = cloudpickle.loads(Path(payload_path).read_bytes())
    setup_globals()
    Singleton.set_state(payload["singleton_state"])

    def one_job(config: DictConfig) -> JobReturn:
        HydraConfig.instance().set_config(config)
        try:
            ret = run_job(
                hydra_context=payload["hydra_context"],
                task_function=payload["task_function"],
                config=config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        except interrupt.Interrupted as sig:  # the job marked its run KILLED
            ret = killed_return(list(config.hydra.overrides.task), f"by {sig.signal_name}")
        except Exception as err:  # Hydra's own setup failed: report it, as a task error is
            ret = failed_return(list(config.hydra.overrides.task), err)
        if ret.status == JobStatus.FAILED and not _picklable(ret._return_value):
            ret._return_value = RuntimeError(repr(ret._return_value))
        return ret

    configs = payload["configs"]
    rets = [one_job(configs[0])] if len(configs) == 1 else run_packed(one_job, configs)
    tmp = Path(result_path + ".tmp")
    tmp.write_bytes(cloudpickle.dumps(rets))
    os.replace(tmp, result_path)


def failed_return(overrides: list[str], error: BaseException) -> JobReturn:
    """What a job that could not run, or whose Hydra setup failed, reports: FAILED with
    ``error``."""
    ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
    ret._return_value = error
    return ret


def killed_return(overrides: list[str], reason: str) -> JobReturn:
    """What a job that a signal stopped (or kept from starting) reports."""
    ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    name = " ".join(filter_overrides(overrides))
    ret._return_value = {"status": "killed", "name": name, "reason": reason}
    return ret


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
