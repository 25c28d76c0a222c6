"""Imported only by the job processes' forkserver (``set_forkserver_preload``), first: the server
dies with the sweep. Its children hold its "parent alive" pipe open, so it would otherwise outlive
a ``kill -9`` of the sweep; its death SIGTERMs each job (:func:`pnn.sweep.launcher.job_process`),
which then ends its run KILLED.
"""

import signal

from pnn.sweep.launcher import die_with_parent

die_with_parent(signal.SIGKILL)
