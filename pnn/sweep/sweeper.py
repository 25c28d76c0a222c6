"""The sweeper behind every ``sweep.py``: Hydra's basic grid, plus checks of every job's config,
launcher keys, memory and store before anything runs; one leased MLflow parent run per sweep
(:mod:`pnn.sweep.sweep_run`); a summary, and a non-zero exit on failures (docs/sweeps.md)."""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from pnn.config import ConfigError, schema, validate, warnings_for
from pnn.schema_keys import describe_unknown
from pnn.sweep import interrupt
from pnn.sweep.launcher import GpuPoolLauncher
from pnn.sweep.outcomes import outcome_of
from pnn.sweep.slots import visible_gpus
from pnn.sweep.slurm import SlurmLauncher

log = logging.getLogger(__name__)


class PNNSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None):
        self.max_batch_size = max_batch_size
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config

    def _job_overrides(self, arguments: list[str]) -> list[list[str]]:
        assert self.hydra_context is not None
        params = [f"{key}={value}" for key, value in self.params.items()]
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(params + list(arguments))
        # A later override of a key replaces an earlier one (`experiment=e6_...` the default
        # sweep over all eight); then the grid, in Hydra's basic sweeper's order.
        choices: dict[str, list[str]] = {}
        for override in overrides:
            key = override.get_key_element()
            if not override.is_sweep_override():
                choices[key] = [f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                choices[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                raise SystemExit(f"error: {key}: interval sweeps need a sweeper that samples")
        return [list(job) for job in itertools.product(*choices.values())]

    def _compose(self, overrides: list[str], idx: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        except ConfigCompositionException as err:
            refuse_unknown_top_level_key(err)
            raise
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg

    def sweep(self, arguments: list[str]) -> Any:
        interrupt.install()
        return self._sweep(arguments)

    def _sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        try:
            check_sweeper_keys(self.max_batch_size)
            launcher = self._launcher()  # gpu_pool checks its own keys
            # hydra-submitit's, by module: Hydra's plugin scan reruns plugin modules (new classes)
            submitit = any("submitit" in cls.__module__ for cls in type(launcher).__mro__)
            if submitit:
                check_submitit_keys(launcher.params)
        except (ConfigError, InstantiationException) as err:
            cause = err.__cause__ if isinstance(err, InstantiationException) else err
            if not isinstance(cause, ConfigError):
                raise
            raise SystemExit(f"error: {cause}") from None
        gpus_visible = jobs_see_a_gpu(launcher, submitit)
        jobs = self._job_overrides(arguments)
        configs = [self._compose(overrides, idx) for idx, overrides in enumerate(jobs)]

        from pnn.train.resources import check_fits

        errors: dict[str, list[int]] = {}
        for idx, cfg in enumerate(configs):
            try:
                validate(cfg)
                if cfg.train.device == "cuda" and not gpus_visible and not cfg.dry_run:
                    raise ConfigError(
                        "train.device=cuda but the jobs run on CPU slots (no GPU visible, or "
                        "hydra.launcher.gpus=[]); use train.device=auto or cpu"
                    )
                if cfg.sweep.detach and not cfg.dry_run and not isinstance(launcher, SlurmLauncher):
                    raise ConfigError(
                        f"sweep.detach=true needs hydra/launcher=slurm (got "
                        f"{type(launcher).__name__}): other launchers' jobs end with the sweep"
                    )
                check_model_builds(cfg)
                if not cfg.dry_run:
                    check_fits(cfg, gpus_visible)
            except ConfigError as err:
                errors.setdefault(str(err), []).append(idx)
        if errors:
            lines = []
            for message, idxs in errors.items():
                where = ""
                if len(jobs) > 1:
                    where = f" (in {len(idxs)} of {len(jobs)} jobs, e.g. {' '.join(jobs[idxs[0]])})"
                lines.append(f"error: {message}{where}")
            raise SystemExit("\n".join(lines))
        for warning in dict.fromkeys(w for cfg in configs for w in warnings_for(cfg)):
            log.warning(f"[sweep] warning: {warning}")

        if all(cfg.dry_run for cfg in configs):
            from pnn.sweep.job import dry_run

            for cfg in configs:
                dry_run(cfg)
            return []

        if interrupt.received():  # during the checks: nothing logged yet
            print(f"[sweep] interrupted by {interrupt.signal_name()} before any job", flush=True)
            raise SystemExit(128 + interrupt.received())
        from pnn.io.storeguard import StoreError
        from pnn.sweep import sweep_run

        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        try:  # the parent run, leased by this process; stale sweeps are closed
            heartbeat = sweep_run.start_sweep(
                configs[0], sweep_dir, command=" ".join(sys.argv[1:]), n_jobs=len(jobs)
            )
        except StoreError as err:
            raise SystemExit(f"error: {err}") from None
        with heartbeat:  # renewed until the parent run is ended; a signal now ends it KILLED
            return self._run_jobs(launcher, jobs, configs, sweep_dir)

    def _run_jobs(
        self,
        launcher: Any,
        jobs: list[list[str]],
        configs: list[DictConfig],
        sweep_dir: Path,
    ) -> Any:
        """Launch the jobs, print the summary, publish the dashboard, end the parent run."""
        from pnn.analysis import dashboard, ui
        from pnn.sweep import sweep_run

        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        ui.open_sweep_view(jobs, configs)  # the MLflow UI's saved view of this sweep's runs

        log.info(f"[sweep] {len(jobs)} job(s); outputs in {sweep_dir}")
        tic = time.monotonic()
        returns: list[JobReturn] = []
        crash = None
        try:
            batch = self.max_batch_size or len(jobs)
            for start in range(0, len(jobs), batch):
                if interrupt.received():
                    break
                returns.extend(launcher.launch(jobs[start : start + batch], start))
        except Exception as err:  # the launcher itself broke: still sum up and end the parent
            crash = f"the launcher failed: {type(err).__name__}: {err}"
            log.error(f"[sweep] {crash}")
        signame = interrupt.signal_name()
        outcomes = []
        for i, overrides in enumerate(jobs):
            if i < len(returns):
                outcomes.append(outcome_of(returns[i], overrides))
            else:
                status = "killed" if signame else "failed"
                reason = f"not started: the sweep got {signame}" if signame else crash
                outcomes.append({"status": status, "name": " ".join(overrides), "reason": reason})
        if not signame and outcomes and all(o["status"] == "submitted" for o in outcomes):
            return self._detached(outcomes)
        failed = print_summary(outcomes, time.monotonic() - tic)
        ui.close_sweep_view()  # kept, or removed if no job ever ran
        if not signame:  # a signalled sweep ends at once; `analyze.py --sweep` can follow
            dashboard.publish(configs[0].tracking.experiment_name, sweep_dir)  # never raises
        # A job killed or lost on its own (scancel, a dead node) is resumed by a rerun; only a
        # job's own error fails the parent run. Each still makes the exit status 1.
        errors = sum(o["status"] not in ("finished", "skipped", "killed", "lost") for o in outcomes)
        status = "KILLED" if signame else "FAILED" if errors else "FINISHED"
        problem = sweep_run.end_sweep(status, {"pnn.killed_by": signame} if signame else {})
        if problem:
            print(f"[sweep] {problem}", file=sys.stderr, flush=True)
        if signame:
            raise SystemExit(128 + interrupt.received())
        if failed or problem:
            raise SystemExit(1)
        return [returns]

    def _detached(self, outcomes: list[dict[str, Any]]) -> Any:
        """``sweep.detach=true``: SLURM has the jobs, which log to MLflow on their own, so the
        parent run ends FINISHED now, not left RUNNING for a sweep process that is gone."""
        from pnn.analysis import ui
        from pnn.io.tracking import ENV_PARENT
        from pnn.sweep import sweep_run

        ids = " ".join(o["slurm_job_id"] for o in outcomes)
        problem = sweep_run.end_sweep("FINISHED", {"pnn.detached": ids})
        print(f"[sweep] detached: {len(outcomes)} job(s) submitted to SLURM: {ids}")
        for outcome in outcomes:
            print(f"  {outcome['slurm_job_id']}  {outcome['name']}")
        print("[sweep] squeue --me shows them; rerun the same command to resume any that fail")
        if problem:
            raise SystemExit(f"[sweep] {problem}")
        print(f"[sweep] the jobs log to MLflow as they run:\n{ui.sweep_links()}")
        parent = os.environ[ENV_PARENT]
        print(f"[sweep] once they are done: python analyze.py --sweep {parent}", flush=True)
        return []

    def _launcher(self) -> Any:
        from hydra.core.plugins import Plugins

        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        return Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=self.task_function, config=self.config
        )


def refuse_unknown_top_level_key(err: ConfigCompositionException) -> None:
    """An unknown top-level key in the sweeper's ``params`` gets pnn's unknown-key message, not
    Hydra's advice to add it with ``+``."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, ConfigAttributeError | ConfigKeyError) and key and "." not in key:
        raise SystemExit(f"error: {describe_unknown([key], schema())}") from None


def check_sweeper_keys(max_batch_size: object) -> None:
    value = max_batch_size
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(
            "hydra.sweeper.max_batch_size must be null (all jobs at once) or a whole number "
            f">= 1 (got {max_batch_size!r})"
        )


def check_submitit_keys(params: dict[str, Any]) -> None:
    for key in ("timeout_min", "array_parallelism", "cpus_per_task", "tasks_per_node"):
        value = params.get(key)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"hydra.launcher.{key} must be a whole number >= 1 (got {value!r})")


def jobs_see_a_gpu(launcher: Any, submitit: bool) -> bool:
    """Whether the jobs will see a GPU: the gpu_pool's slots, SLURM's GPUs, else this machine's."""
    if isinstance(launcher, GpuPoolLauncher) and launcher.gpus is not None:
        return bool(launcher.gpus)  # null: every visible GPU
    if submitit:  # SLURM's, or submitit's local executor
        return bool(launcher.params.get("gpus_per_task") or launcher.params.get("gpus_per_node"))
    return bool(visible_gpus())  # the jobs run here


def check_model_builds(cfg: DictConfig) -> None:
    """Build the model on the meta device: every shape rule checked, nothing allocated or logged."""
    import torch

    from pnn.model.models import build_model

    with torch.device("meta"):
        build_model(cfg, init=False)


def print_summary(outcomes: list[dict[str, Any]], seconds: float) -> int:
    """Print the sweep's summary; returns the number of jobs that failed, were killed or were
    lost (ended without a result: SLURM)."""
    keys = ("finished", "skipped", "killed", "lost")
    counts = {key: sum(o["status"] == key for o in outcomes) for key in keys}
    failures = [o for o in outcomes if o["status"] not in keys]
    killed = f", {counts['killed']} killed" if counts["killed"] else ""
    lost = f", {counts['lost']} lost" if counts["lost"] else ""
    lines = [
        f"[sweep] done in {seconds:.0f}s: {counts['finished']} finished, "
        f"{counts['skipped']} skipped, {len(failures)} failed{killed}{lost}"
    ]
    for status, label in (("skipped", "skipped"), ("killed", "KILLED "), ("lost", "LOST   ")):
        for outcome in outcomes:
            if outcome["status"] == status:
                lines.append(f"  {label} {outcome['name']}: {outcome.get('reason', '')}")
    for outcome in failures:
        lines.append(f"  FAILED  {outcome['name']}: {outcome.get('reason', 'unknown')}")
    print("\n".join(lines), flush=True)
    return len(failures) + counts["killed"] + counts["lost"]
