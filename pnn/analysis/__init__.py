"""The analysis: the store's runs as pandas tables, comparability, the claims and their
intervals, the report and plots, the sweep's dashboard and the UI links.

Imports ``pnn.io`` and ``pnn.config``; never ``pnn.train`` or ``pnn.model``, so that
``analyze.py`` needs no torch.
"""
