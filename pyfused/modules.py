"""``FusedMLP``: Linear → ReLU (or sigmoid) → Linear → log_softmax as one module, with nn.Linear's parameters and
state_dict."""
import torch
from torch import nn

from pyfused import checks
from pyfused.functional import fused_deep_mlp, fused_mlp, fused_mlp_nll


class FusedMLP(nn.Module):
    """``log_softmax(fc2(act(fc1(x))), dim=-1)`` through the fused kernels; ``act`` is ``activation``, "relu"
    (the default) or "sigmoid".

    ``fc1 = nn.Linear(in_features, hidden_features, bias)`` and ``fc2 = nn.Linear(hidden_features,
    out_features, bias)`` are created in that order, so under the same ``torch.manual_seed`` the parameters,
    their names and the state_dict equal those of the nn.Linear pair (``fc1.weight``, ``fc1.bias``, ...).
    The activation has no parameters and is not in the state_dict.
    """

    activation = "relu"  # the default, also for FusedMLPs pickled before the attribute existed

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, *, activation: str = "relu") -> None:
        checks.check_activation(activation)
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features, bias, device=device, dtype=dtype)
        self.activation = activation

    @classmethod
    def from_linear(cls, fc1: nn.Linear, fc2: nn.Linear, *, activation: str = "relu") -> "FusedMLP":
        """A FusedMLP that shares (does not copy) the Parameters of ``fc1`` and ``fc2``."""
        checks.check_activation(activation)
        for name, fc in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(fc, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(fc).__name__}")
        if fc2.in_features != fc1.out_features:
            raise ValueError(f"fc2.in_features must equal fc1.out_features ({fc1.out_features}), got {fc2.in_features}")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("fc1 and fc2 must both have a bias or both have none")
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.fc1, model.fc2, model.activation = fc1, fc2, activation
        return model

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_features

    @property
    def out_features(self) -> int:
        return self.fc2.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (*, out_features) for x of shape (*, in_features)."""
        return fused_mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.activation)

    def nll_loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                 ignore_index: int = -100) -> torch.Tensor:
        """``F.nll_loss(self(x), target, ...)`` with the loss fused into the forward kernel."""
        return fused_mlp_nll(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, target,
                             reduction=reduction, ignore_index=ignore_index, activation=self.activation)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, hidden_features={self.hidden_features}, " \
               f"out_features={self.out_features}, bias={self.fc1.bias is not None}, activation={self.activation!r}"


class DeepFusedMLP(nn.Module):
    """``log_softmax(fcL(act(... act(fc1(x)))))``: an MLP of any depth through the fused kernels.

    ``DeepFusedMLP(in, h1, ..., out, activation="relu", bias=True, device=None, dtype=None)`` makes
    ``fc1 = nn.Linear(in, h1, bias)``, ``fc2``, ... ``fcL`` in order (so the same init as the nn.Linear layers
    of an nn.Sequential under one ``torch.manual_seed``), with ``activation`` after every layer but the last:
    one name for all, or one per hidden layer (e.g. the course's ``DeepFusedMLP(20, 13, 8, 3,
    activation=("relu", "sigmoid"))``). With two layers it computes what a :class:`FusedMLP` does, with the same
    parameter names and kernels (FusedTrainStep takes FusedMLP only).
    """

    def __init__(self, *features: int, activation="relu", bias: bool = True, device=None, dtype=None) -> None:
        if len(features) < 3:
            raise ValueError(f"DeepFusedMLP needs in, at least one hidden and out features, got {features}")
        hidden_layers = len(features) - 2
        activations = (activation,) * hidden_layers if isinstance(activation, str) else tuple(activation)
        if len(activations) != hidden_layers:
            raise ValueError(f"activation must be one name or one per hidden layer ({hidden_layers}), "
                             f"got {len(activations)}")
        for name in activations:
            checks.check_activation(name)
        super().__init__()
        for i, (n_in, n_out) in enumerate(zip(features, features[1:]), 1):
            setattr(self, f"fc{i}", nn.Linear(n_in, n_out, bias, device=device, dtype=dtype))
        self.activations = activations

    def linears(self) -> list:
        """fc1 ... fcL."""
        return [getattr(self, f"fc{i}") for i in range(1, len(self.activations) + 2)]

    def _params(self):
        layers = self.linears()
        return [fc.weight for fc in layers], [fc.bias for fc in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (*, out) for x of shape (*, in)."""
        return fused_deep_mlp(x, *self._params(), self.activations)

    def nll_loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                 ignore_index: int = -100) -> torch.Tensor:
        """``F.nll_loss(self(x), target, ...)`` with the loss fused into the last two layers' kernel."""
        return fused_deep_mlp(x, *self._params(), self.activations, target, reduction, ignore_index)

    def extra_repr(self) -> str:
        return f"activations={self.activations}"
