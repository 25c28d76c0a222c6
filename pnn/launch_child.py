"""Entry point of one job process started by the gpu_pool launcher."""

import sys

from pnn.launcher import die_with_parent, run_child

if __name__ == "__main__":
    die_with_parent()
    run_child(sys.argv[1], sys.argv[2])
