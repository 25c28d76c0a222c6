"""The sweeper behind every ``sweep.py`` invocation.

It is Hydra's basic sweeper (same grid syntax, same job numbering), plus what a researcher
running many jobs needs:

- every job's config is composed and validated before any job starts, so a typo in one grid
  value fails the whole command before data is loaded or anything is logged;
- dry runs are answered in-process, one JSON line per job, without a launcher or MLflow;
- one MLflow parent run per invocation, whose id the jobs read from the environment;
- jobs report instead of raising, so one failure does not stop the others; at the end a
  summary lists finished, skipped and failed jobs, and the command exits non-zero on failures.

Hydra only instantiates plugins that live under ``hydra_plugins``; that package re-exports
this class.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from pnn.config import ConfigError, validate

log = logging.getLogger(__name__)


class PNNSweeper(Sweeper):
    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        self._split = BasicSweeper.split_arguments
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
        # Later overrides of the same key replace earlier ones, so `experiment=e6_...` on the
        # command line replaces the default sweep over all eight.
        batches = self._split(overrides, None)
        return [list(job) for job in batches[0]]

    def _compose(self, overrides: list[str], idx: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(cfg):
            cfg.hydra.job.id = idx
            cfg.hydra.job.num = idx
        return cfg

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.hydra_context is not None
        jobs = self._job_overrides(arguments)
        configs = [self._compose(overrides, idx) for idx, overrides in enumerate(jobs)]

        errors: dict[str, list[int]] = {}
        for idx, cfg in enumerate(configs):
            try:
                validate(cfg)
                check_model_builds(cfg)
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

        if all(cfg.dry_run for cfg in configs):
            from pnn.job import dry_run

            for cfg in configs:
                dry_run(cfg)
            return []

        from pnn import dashboard, tracking

        sweep_dir = Path(str(self.config.hydra.sweep.dir)).resolve()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        tracking.start_sweep(
            configs[0], sweep_dir, command=" ".join(sys.argv[1:]), n_jobs=len(jobs)
        )

        launcher = self._launcher()
        log.info(f"[sweep] {len(jobs)} job(s); outputs in {sweep_dir}")
        tic = time.monotonic()
        returns: list[JobReturn] = []
        batch = self.max_batch_size or len(jobs)
        for start in range(0, len(jobs), batch):
            returns.extend(launcher.launch(jobs[start : start + batch], initial_job_idx=start))
        outcomes = [outcome_of(r, overrides) for r, overrides in zip(returns, jobs, strict=True)]
        failed = print_summary(outcomes, time.monotonic() - tic)
        dashboard.publish(configs[0].tracking.experiment_name, sweep_dir)  # never raises
        tracking.end_sweep(failed=failed)
        if failed:
            raise SystemExit(1)
        return [returns]

    def _launcher(self) -> Any:
        from hydra.core.plugins import Plugins

        assert self.config is not None and self.hydra_context is not None
        assert self.task_function is not None
        return Plugins.instance().instantiate_launcher(
            hydra_context=self.hydra_context, task_function=self.task_function, config=self.config
        )


def check_model_builds(cfg: DictConfig) -> None:
    """Build the model on the meta device: every shape rule of ``pnn.models`` is checked, and
    no memory is allocated, no data loaded, nothing logged."""
    import torch

    from pnn.models import build_model

    with torch.device("meta"):
        build_model(cfg)


def outcome_of(ret: JobReturn, overrides: Sequence[str]) -> dict[str, Any]:
    """What a job reported, or why it reported nothing."""
    if ret.status == JobStatus.COMPLETED and isinstance(ret._return_value, dict):
        return dict(ret._return_value)
    if ret.status == JobStatus.FAILED:
        reason = f"{type(ret._return_value).__name__}: {ret._return_value}"
    else:
        reason = f"job returned {ret._return_value!r}"
    return {"status": "failed", "name": " ".join(overrides), "reason": reason}


def print_summary(outcomes: list[dict[str, Any]], seconds: float) -> int:
    counts = {key: sum(o["status"] == key for o in outcomes) for key in ("finished", "skipped")}
    failures = [o for o in outcomes if o["status"] not in ("finished", "skipped")]
    lines = [
        f"[sweep] done in {seconds:.0f}s: {counts['finished']} finished, "
        f"{counts['skipped']} skipped, {len(failures)} failed"
    ]
    for outcome in outcomes:
        if outcome["status"] == "skipped":
            lines.append(f"  skipped {outcome['name']}: {outcome.get('reason', '')}")
    for outcome in failures:
        lines.append(f"  FAILED  {outcome['name']}: {outcome.get('reason', 'unknown')}")
    print("\n".join(lines), flush=True)
    return len(failures)
