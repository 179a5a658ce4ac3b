"""pyfused: fused Triton kernels for small-MLP training, exact to PyTorch semantics.

``fused_mlp`` (log-probabilities or logits), ``fused_mlp_nll``, ``fused_mlp_cross_entropy`` and ``fused_mlp_mse``
are the fused ops (``fused_deep_mlp`` for any depth), ``FusedMLP`` and ``DeepFusedMLP`` the drop-in modules,
``FusedSGD``, ``FusedAdam`` and ``FusedAdamW`` the fused optimizers, ``FusedTrainStep`` the whole training step;
``fuse(model)`` runs an existing model's nn.Sequential MLP blocks through the kernels, in place (``unfuse`` undoes
it).
Triton is imported only when a kernel is first launched.
"""
from pyfused import custom_ops  # noqa: F401  (registers the torch.library ops used under torch.compile)
from pyfused.fusing import fuse, unfuse
from pyfused.functional import fused_deep_mlp, fused_mlp, fused_mlp_cross_entropy, fused_mlp_mse, fused_mlp_nll
from pyfused.modules import DeepFusedMLP, FusedMLP
from pyfused.optim import FusedAdam, FusedAdamW, FusedSGD
from pyfused.train_step import FusedTrainStep

__all__ = ["fused_mlp", "fused_mlp_nll", "fused_mlp_cross_entropy", "fused_mlp_mse", "fused_deep_mlp", "FusedMLP",
           "DeepFusedMLP", "FusedSGD", "FusedAdam", "FusedAdamW", "FusedTrainStep", "fuse", "unfuse"]
