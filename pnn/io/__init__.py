"""MLflow I/O: what the sweep writes, what the analysis reads back, the store guard and MLflow's
run context. Imports only ``pnn.config``: it neither trains nor leases jobs."""
