"""The training CLI, ``pyfused-train`` (also ``python -m pyfused.train``): the course's fit() on the fused engine.

:mod:`~pyfused.cli.train` (arguments, the training loop, reports), :mod:`~pyfused.cli.steps` (the fused step and the
plain-PyTorch reference behind one interface), :mod:`~pyfused.cli.data` (Fashion-MNIST IDX files and a synthetic
stand-in on the device), :mod:`~pyfused.cli.ranks` (one process or one rank of a torchrun job).
"""
