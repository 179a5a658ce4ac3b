"""pyfused: fused Triton kernels for small-MLP training, exact to PyTorch semantics.

``fused_mlp`` / ``fused_mlp_nll`` are the fused ops, ``FusedMLP`` the drop-in module (``DeepFusedMLP`` and
``fused_deep_mlp`` for more layers), ``FusedSGD`` the fused momentum-SGD optimizer, ``FusedTrainStep`` the whole
training step. Triton is imported only when a kernel is first launched.
"""
from pyfused import library  # noqa: F401  (registers the torch.library ops used under torch.compile)
from pyfused.functional import fused_deep_mlp, fused_mlp, fused_mlp_nll
from pyfused.modules import DeepFusedMLP, FusedMLP
from pyfused.optim import FusedSGD
from pyfused.train_step import FusedTrainStep

__all__ = ["fused_mlp", "fused_mlp_nll", "fused_deep_mlp", "FusedMLP", "DeepFusedMLP", "FusedSGD", "FusedTrainStep"]
