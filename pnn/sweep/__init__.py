"""The sweep: Hydra's sweeper and the gpu_pool launcher, job processes, their signals and leases.
The top stage: it may import every other (``pnn.analysis`` only for the end-of-sweep dashboard)."""
