"""The sweep: Hydra's sweeper and the gpu_pool launcher, job processes and their signals,
one job's phases and its lease on its MLflow run.

The top stage: it may import every other (``pnn.analysis`` only for the dashboard it
publishes when the sweep ends).
"""
