"""What each of pnn-sweep's processes pays for without needing it: the garbage collection at
interpreter exit (pnn.shutdown, after the atexit handlers), and scipy.stats before an interval."""

from __future__ import annotations

import pytest
from conftest import run_python

# Runs the program as ``__main__`` after registering a handler that atexit calls last (it was
# registered first): by then the heap must be frozen.
PROBE = """
import atexit, gc, runpy, sys
atexit.register(lambda: print("frozen at exit:", gc.get_freeze_count() > 0, flush=True))
sys.argv = {argv!r}
{run}
"""


@pytest.mark.parametrize(
    ("argv", "run"),
    [
        (["sweep.py", "--help"], "runpy.run_path('sweep.py', run_name='__main__')"),
        (["analyze.py", "--help"], "runpy.run_path('analyze.py', run_name='__main__')"),
        (["ui", "--help"], "runpy.run_module('pnn.analysis.ui', run_name='__main__')"),
    ],
    ids=["sweep.py", "analyze.py", "pnn.analysis.ui"],
)
def test_programs_freeze_the_heap_after_their_exit_handlers(argv: list[str], run: str) -> None:
    proc = run_python(PROBE.format(argv=argv, run=run), timeout=120)
    assert "frozen at exit: True" in proc.stdout, proc.stdout + proc.stderr


def test_handlers_registered_later_run_before_the_freeze() -> None:
    code = (
        "import atexit, gc\n"
        "from pnn.shutdown import skip_exit_collection\n"
        "skip_exit_collection()\n"
        "atexit.register(lambda: print('handler saw a frozen heap:', gc.get_freeze_count() > 0))\n"
    )
    proc = run_python(code)
    assert proc.stdout.strip() == "handler saw a frozen heap: False", proc.stderr


def test_the_analysis_imports_scipy_stats_only_for_an_interval() -> None:
    code = (
        "import sys\n"
        "from pnn.analysis import dashboard, report, intervals\n"
        "print('before:', 'scipy.stats' in sys.modules)\n"
        "print('one seed:', intervals.mean_interval([1.0]), 'scipy.stats' in sys.modules)\n"
        "intervals.welch_interval([1.0, 2.0], [3.0, 5.0])\n"
        "print('two seeds:', 'scipy.stats' in sys.modules)\n"
    )
    proc = run_python(code)
    assert proc.stdout.splitlines() == [
        "before: False",
        "one seed: (nan, nan) False",
        "two seeds: True",
    ], proc.stdout + proc.stderr
