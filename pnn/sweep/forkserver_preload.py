"""Preloaded first by the job processes' forkserver: the server ignores SIGTERM, so a signal to the
sweep's process group stops the jobs (:func:`pnn.sweep.launcher.job_process`), not the server."""

import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
