"""Rebuild the result tables and figures from the MLflow runs that sweep.py logged.

    python analyze.py                               # every finished run in ./mlflow.db
    python analyze.py --sweep latest                # only the most recent sweep.py invocation
    python analyze.py --by masks.nmasks             # group by these keys, not the swept ones
    python analyze.py --claims my_claims.yaml       # the README's claims and yours

By default the results are grouped by the swept keys (:mod:`pnn.analysis.ablations`). Writes
the tables (Markdown, CSV, LaTeX), claims, ablations, figures, report.html and next_seeds.sh
under --out (default results/); docs/analysis.md lists them. The store is --tracking-uri if
given, else $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db. Exit status 1, with a one-line
message, when there is nothing to analyse.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="analyze.py",
        description="Rebuild the PNN result tables and figures from MLflow.",
        epilog="Store precedence: --tracking-uri > $MLFLOW_TRACKING_URI > sqlite:///./mlflow.db",
    )
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: see below)")
    parser.add_argument("--experiment-name", default="pnn", help="MLflow experiment (pnn)")
    parser.add_argument(
        "--sweep",
        metavar="ID|latest",
        help="only the job runs a sweep created or resumed: a parent run id, a pnn.sweep_id, "
        "or 'latest' (jobs it skipped as already finished belong to the earlier sweep)",
    )
    parser.add_argument(
        "--by",
        action="append",
        metavar="KEY",
        help="config key(s) to group by besides the experiment, e.g. masks.nmasks "
        "(repeatable or comma-separated); default: the swept keys found in the runs; "
        "'none': no grouping",
    )
    parser.add_argument(
        "--claims",
        action="append",
        type=Path,
        default=[],
        metavar="FILE",
        help="a YAML file of your own claims, added to the README's (conf/claims/readme.yaml); "
        "repeatable",
    )
    parser.add_argument(
        "--run",
        metavar="RUN_ID",
        help="run for the reported-vs-actual figure (default: the largest reported-actual gap)",
    )
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.05,
        help="level of the Holm-corrected verdicts and of the seeds needed (default 0.05)",
    )
    args = parser.parse_args(argv)
    if not 0 < args.alpha < 1:
        parser.error(f"--alpha must lie between 0 and 1, exclusive (got {args.alpha:g})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)

    from pnn.analysis.report import write_report
    from pnn.analysis.results import parse_by
    from pnn.analysis.runs import AnalysisError, resolve_tracking_uri
    from pnn.io.storeguard import as_store_error

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        report, text = write_report(
            tracking_uri=uri,
            experiment_name=args.experiment_name,
            sweep=args.sweep,
            by=parse_by(args.by),
            run_id=args.run,
            out=args.out,
            claims_files=args.claims,
            alpha=args.alpha,
        )
    except AnalysisError as err:
        print(f"analyze.py: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # the store failed while being read: one line, not a traceback
        problem = as_store_error(uri, err)
        if problem is None:
            raise
        print(f"analyze.py: {problem}", file=sys.stderr)
        return 1
    print(text)
    print("Wrote " + ", ".join(str(p) for p in report.written))
    return 0


if __name__ == "__main__":
    from pnn.shutdown import skip_exit_collection

    skip_exit_collection()
    sys.exit(main())
