"""Entry point of one job process started by the gpu_pool launcher."""

import sys

from pnn.shutdown import skip_exit_collection
from pnn.sweep.interrupt import Interrupted, install_child, received

if __name__ == "__main__":
    skip_exit_collection()
    install_child()  # first: from here on a signal marks the job's run KILLED, no traceback
    try:
        from pnn.sweep.launcher import die_with_parent, run_child

        die_with_parent()
        run_child(sys.argv[1], sys.argv[2])
    except Interrupted as sig:  # before the job started: nothing of it to mark
        sys.exit(128 + sig.signum)
    if received():  # the job reported being stopped by a signal: say so to the launcher
        sys.exit(128 + received())
