"""The sweep's parent run as its dashboard: at the end of a sweep, its analysis goes on it.

:func:`publish` runs what ``analyze.py --sweep <parent run id> --out <sweep dir>/results``
runs (:func:`pnn.analysis.report.write_report`), logs every file it wrote (tables, figures,
``report.html``) as artifacts of the parent run, and puts the results table in the parent's
description (``mlflow.note.content``). Then it prints where to look in the MLflow UI.

An analysis that fails (all jobs failed or were skipped, a store error) never fails the sweep:
it becomes a warning and the tag ``pnn.analysis_error`` on the parent.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pnn.analysis import ui
from pnn.io import tracking

log = logging.getLogger(__name__)

ERROR_TAG = "pnn.analysis_error"
NOTE_TAG = "mlflow.note.content"
NOTE_LIMIT = 8000  # MLflow's longest tag value


def publish(experiment_name: str, sweep_dir: Path) -> None:
    """Analyse the sweep whose parent run ``sweep_run.start_sweep`` made; never raises."""
    uri, parent = os.environ.get(tracking.ENV_URI), os.environ.get(tracking.ENV_PARENT)
    if not uri or not parent:
        return

    from pnn.io import storeguard

    try:
        client = storeguard.client(uri)
    except storeguard.StoreError as err:
        log.warning(f"[sweep] no results on the parent run: {err}")
        return
    out = sweep_dir / "results"
    try:
        _analyse_onto(client, uri, experiment_name, parent, out)
    except Exception as err:  # whatever went wrong, the sweep's jobs are done
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:500]
        log.warning(
            f"[sweep] no results on the parent run: the analysis failed ({reason}). "
            f"Run `python analyze.py --sweep {parent}` to see why."
        )
        try:
            tracking.set_tags(client, parent, {ERROR_TAG: reason})
        except Exception as tag_err:  # the store itself may be what failed
            log.warning(f"[sweep] could not tag the parent run either: {tag_err}")
    try:
        print(f"[sweep] compare the runs in the MLflow UI:\n{ui.sweep_links()}", flush=True)
    except Exception as err:  # a link is a convenience
        log.warning(f"[sweep] could not look up the parent run for the UI link: {err}")


def _analyse_onto(client: Any, uri: str, experiment_name: str, parent: str, out: Path) -> None:
    from pnn.analysis.formats import markdown
    from pnn.analysis.report import write_report

    report, _ = write_report(uri, experiment_name, sweep=parent, out=out)
    for path in report.written:  # claims.csv and whatever else write_report adds, too
        tracking.retry(lambda path=path: client.log_artifact(parent, str(path)))
    command = tracking.retry(lambda: client.get_run(parent)).data.tags.get("pnn.command", "")
    tables = "\n".join(markdown(t) for t in report.summary_tables)
    note = description(command, tables, parent, ui.sweep_view_link())
    tracking.set_tags(client, parent, {NOTE_TAG: note})
    print(f"[sweep] results of this sweep: {out / 'results.md'} (also on the parent run {parent})")


def description(command: str, table_md: str, parent: str, view_link: str = "") -> str:
    """The parent run's description: the command, the link to the sweep's saved view in the
    MLflow UI, the results table (and the ablations, when the sweep swept keys: their figures
    are artifacts beside it), where the rest is."""
    args = "" if command == "(no arguments)" else command
    head = f"`sweep.py {args}`".replace(" `", "`") + "\n\n"
    if view_link:
        head += f"{view_link}\n\n"
    tail = (
        "\n\nThe figures, the other tables and report.html are this run's artifacts; "
        f"`python analyze.py --sweep {parent}` rebuilds them."
    )
    text = head + table_md.rstrip() + tail
    if len(text) > NOTE_LIMIT:
        cut = "\n\n(table cut at MLflow's tag length limit; the whole table is results.md)"
        text = text[: NOTE_LIMIT - len(cut)].rsplit("\n", 1)[0] + cut
    return text
