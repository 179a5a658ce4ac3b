"""Triton kernels of pyfused (installed as ``pyfused.kernels``): ``@triton.jit`` functions and their launchers.

No autograd and no modules here; :mod:`pyfused.functional` and :mod:`pyfused.optim` wrap them.
"""
