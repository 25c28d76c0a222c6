"""The job processes' forkserver imports this first (``set_forkserver_preload``).

The server ignores SIGTERM, which must stop the jobs, not the server: the launcher learns from
the server that a job ended, and would take a job still marking its run KILLED for a dead one.
It dies with the sweep (its children keep its "parent alive" pipe open, so it would outlive a
``kill -9``), and its death SIGTERMs each job, which then ends its run KILLED."""

import signal

from pnn.sweep.launcher import die_with_parent

signal.signal(signal.SIGTERM, signal.SIG_IGN)
die_with_parent(signal.SIGKILL)
