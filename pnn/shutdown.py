"""A quicker end for pnn-sweep's programs: no garbage collection at interpreter exit.

A process that has imported torch and MLflow holds millions of objects, and CPython's shutdown
collects them all again before it exits, in every ``sweep.py`` and job process (figures in
bench/RESULTS.md). :func:`skip_exit_collection` freezes the heap (:func:`gc.freeze`) once the
``atexit`` handlers have run, so that those last collections find nothing to scan.

The handlers (MLflow ending runs, loggers flushing) run before the freeze. Objects with a
``__del__`` caught in a reference cycle are not finalized at exit, which CPython never promises.
"""

from __future__ import annotations

import atexit
import gc


def skip_exit_collection() -> None:
    """Call first thing in a program: ``atexit`` runs handlers last-registered first, so the
    freeze comes after every handler registered later (MLflow's, logging's)."""
    atexit.register(gc.freeze)
