"""Imported only by the job processes' forkserver (``set_forkserver_preload``), first: the server
then survives a SIGTERM to the sweep's process group, and goes on reporting its jobs' exits.
Its children install their own handler (:func:`pnn.sweep.launcher.job_process`)."""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
