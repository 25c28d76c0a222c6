"""``hydra/launcher=gpu_pool``: parallel jobs on one machine, one GPU per job.

Every job runs in a fresh Python process whose ``CUDA_VISIBLE_DEVICES`` is set before the
process starts, so CUDA can only ever see the job's own GPU. A slot is a (GPU, packing index)
pair; a job holds its slot until its process exits, so no two jobs share a GPU beyond
``jobs_per_gpu``, however many jobs a slot runs one after another. Without GPUs the slots are
``cpu_workers`` CPU workers, each with an equal share of the cores.

A job process that dies (killed, out of memory) is reported as a failure with its exit code;
the other jobs go on. The job processes ask the kernel to end them if this process dies, so a
killed sweep leaves nothing running.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
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
from omegaconf import DictConfig, open_dict

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
    if jobs_per_gpu < 1:
        raise ValueError(f"hydra.launcher.jobs_per_gpu must be >= 1 (got {jobs_per_gpu})")
    if cpu_workers < 1:
        raise ValueError(f"hydra.launcher.cpu_workers must be >= 1 (got {cpu_workers})")
    ids = [str(g) for g in gpus] if gpus is not None else visible_gpus()
    if ids:
        return [
            {"CUDA_VISIBLE_DEVICES": gpu, "PNN_SLOT": f"gpu{gpu}.{k}"}
            for k in range(jobs_per_gpu)
            for gpu in ids
        ]
    threads = str(max(1, (os.cpu_count() or 1) // cpu_workers))
    return [
        {
            "CUDA_VISIBLE_DEVICES": "",
            "PNN_SLOT": f"cpu{k}",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads),
            "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", threads),
        }
        for k in range(cpu_workers)
    ]


class GpuPoolLauncher(Launcher):
    def __init__(
        self, gpus: list[int] | None = None, jobs_per_gpu: int = 1, cpu_workers: int = 1
    ) -> None:
        self.gpus = list(gpus) if gpus is not None else None
        self.jobs_per_gpu = jobs_per_gpu
        self.cpu_workers = cpu_workers
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
        log.info(f"[sweep] launching {total} job(s) on {len(slots)} {where} slot(s)")
        pending: queue.Queue[int] = queue.Queue()
        for i in range(total):
            pending.put(i)
        results: list[JobReturn | None] = [None] * total
        done = [0]
        lock = threading.Lock()
        workdir = Path(tempfile.mkdtemp(prefix="pnn-launch-"))

        def worker(slot: dict) -> None:
            while True:
                try:
                    i = pending.get_nowait()
                except queue.Empty:
                    return
                idx = initial_job_idx + i
                name = " ".join(filter_overrides(job_overrides[i]))
                log.info(f"[sweep] job #{idx} starting on {slot['PNN_SLOT']}: {name}")
                ret = self._run_one(list(job_overrides[i]), idx, slot, workdir)
                results[i] = ret
                with lock:
                    done[0] += 1
                    status = outcome_of(ret, job_overrides[i])["status"]
                    log.info(f"[sweep] {done[0]}/{total} jobs done; job #{idx} {status}: {name}")

        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return [r for r in results if r is not None]

    def _run_one(self, overrides: list[str], idx: int, slot: dict, workdir: Path) -> JobReturn:
        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        payload = workdir / f"job{idx}.pkl"
        result = workdir / f"job{idx}.result.pkl"
        payload.write_bytes(
            cloudpickle.dumps(
                {
                    "hydra_context": self.hydra_context,
                    "task_function": self.task_function,
                    "config": sweep_config,
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
        proc = subprocess.run(cmd, env=env, check=False)
        payload.unlink(missing_ok=True)
        if result.exists():
            ret = cloudpickle.loads(result.read_bytes())
            result.unlink()
            run_ids.unlink(missing_ok=True)
            return ret
        code: int | str = proc.returncode
        if proc.returncode < 0 and -proc.returncode in signal.valid_signals():
            code = f"{proc.returncode} ({signal.Signals(-proc.returncode).name})"
        reason = (
            f"job process exited with code {code} before reporting (killed, or out of "
            "memory?); rerun the same command to resume it"
        )
        marked = mark_runs_killed(run_ids, reason)
        ret = JobReturn(overrides=overrides, status=JobStatus.FAILED)
        marked_note = "".join(f"; run {r} marked KILLED" for r in marked)
        ret._return_value = RuntimeError(reason + marked_note)
        return ret


def mark_runs_killed(run_ids: Path, reason: str) -> list[str]:
    """Mark KILLED the runs a dead job process had claimed (listed in ``run_ids``), unless
    another process has adopted them since. The ids of the runs marked."""
    if not run_ids.exists() or not os.environ.get(ENV_URI):
        return []
    from mlflow.tracking import MlflowClient

    from pnn.claim import mark_killed

    client = MlflowClient(os.environ[ENV_URI])
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
    config = payload["config"]
    HydraConfig.instance().set_config(config)
    ret = run_job(
        hydra_context=payload["hydra_context"],
        task_function=payload["task_function"],
        config=config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    if ret.status == JobStatus.FAILED and not _picklable(ret._return_value):
        ret._return_value = RuntimeError(repr(ret._return_value))
    tmp = Path(result_path + ".tmp")
    tmp.write_bytes(cloudpickle.dumps(ret))
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
