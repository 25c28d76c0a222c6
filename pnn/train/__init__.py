"""Training one job: data on the device, the step (eager or CUDA graph), the epoch loop,
the two accuracies, checkpoints, the memory estimate, and packed seeds taking turns.

Imports ``pnn.model`` and ``pnn.config``; never MLflow: the loop reports each epoch
through a callback, and ``pnn.sweep`` logs it.
"""
