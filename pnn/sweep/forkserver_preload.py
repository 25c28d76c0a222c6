"""Imported only by the job processes' forkserver (``set_forkserver_preload``), first.

The server ignores SIGTERM: a SIGTERM to the sweep's process group must stop the jobs, not the
server. The launcher learns that a job ended from the server, so if the server died first it
would take a job still marking its run KILLED for one that died (exit code 255). Each job installs
its own handler (:func:`pnn.sweep.launcher.job_process`). The server also dies with the sweep:
its children hold its "parent alive" pipe open, so it would otherwise outlive a ``kill -9`` of the
sweep. Its death SIGTERMs each job, which then ends its run KILLED.
"""

import signal

from pnn.sweep.launcher import die_with_parent

signal.signal(signal.SIGTERM, signal.SIG_IGN)
die_with_parent(signal.SIGKILL)
