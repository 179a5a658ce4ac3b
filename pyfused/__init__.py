"""pyfused: fused Triton kernels for small-MLP training, exact to PyTorch semantics.

``fused_mlp`` / ``fused_mlp_nll`` are the fused ops, ``FusedMLP`` the drop-in module, ``FusedSGD`` the fused
momentum-SGD optimizer. Triton is imported only when a kernel is first launched.
"""
from pyfused import library  # noqa: F401  (registers the torch.library ops used under torch.compile)
from pyfused.functional import fused_mlp, fused_mlp_nll
from pyfused.modules import FusedMLP
from pyfused.optim import FusedSGD
from pyfused.train_step import FusedTrainStep

__all__ = ["fused_mlp", "fused_mlp_nll", "FusedMLP", "FusedSGD", "FusedTrainStep"]
