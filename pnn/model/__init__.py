"""The networks: PerturbLayer and NoiseLayer, the fused perturbation they compute, and the
architectures built from them (``build_model``).

Imports only ``pnn.config`` (and torch): no MLflow, no Hydra, so that it runs on a bare
GPU image (``bench/``).
"""
