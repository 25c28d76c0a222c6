"""``sweep.detach=true``: the sweep ends once SLURM has its jobs.

The jobs log to MLflow on their own (the sweep's environment, parent run id included, goes with
them), so nothing waits for them here: the parent run ends FINISHED at once, tagged
``pnn.detached``, never left RUNNING for a sweep process that is gone. ``analyze.py`` and a rerun
of the same command see the jobs' runs as they come.
"""

from __future__ import annotations

import os
from typing import Any

from pnn.io import storeguard, tracking

TAG_DETACHED = "pnn.detached"


def end_detached(outcomes: list[dict[str, Any]]) -> list:
    """Print the submitted jobs and where to follow them; end the parent run FINISHED."""
    from pnn.analysis import ui

    ids = [o["slurm_job_id"] for o in outcomes]
    lines = [f"[sweep] detached: {len(ids)} job(s) submitted to SLURM: {' '.join(ids)}"]
    lines += [f"  {o['slurm_job_id']}  {o['name']}" for o in outcomes]
    run_id, uri = os.environ.get(tracking.ENV_PARENT), os.environ.get(tracking.ENV_URI)
    if run_id and uri:
        client = storeguard.client(uri)
        tracking.set_tags(client, run_id, {TAG_DETACHED: " ".join(ids)})
        tracking.retry(lambda: client.set_terminated(run_id, "FINISHED"))
        experiment_id = tracking.retry(lambda: client.get_run(run_id)).info.experiment_id
        lines.append("[sweep] the jobs log to MLflow as they run:")
        lines.append(ui.how_to_open(uri, experiment_id, run_id, ui.sweep_view_key()))
        lines.append(f"[sweep] once they are done: python analyze.py --sweep {run_id}")
    lines.append("[sweep] squeue --me shows them; rerun the same command to resume any that fail")
    print("\n".join(lines), flush=True)
    return []
