"""MLflow I/O: what the sweep writes (runs, params, metrics, tags), what the analysis reads
back, the store guard (checks and one-line errors) and MLflow's standard run context.

Imports only ``pnn.config``: it neither trains (``pnn.train``) nor leases jobs
(``pnn.sweep``).
"""
