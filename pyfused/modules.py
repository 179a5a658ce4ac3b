"""``FusedMLP`` and ``DeepFusedMLP``: MLPs of nn.Linear layers with a fused forward, head, loss and backward, with
nn.Linear's parameters, init and state_dict."""
from __future__ import annotations

import functools

import torch
from torch import nn

from pyfused import checks
from pyfused.functional import checked


@functools.cache
def _fc_names(n_layers: int) -> tuple:
    return tuple(f"fc{i}" for i in range(1, n_layers + 1))


_MISSING = object()


def _param(fc, name):
    """``fc.<name>`` without nn.Module.__getattr__ on the common path (an nn.Linear's own Parameter or None);
    a parametrized weight (a property) goes through getattr."""
    p = fc._parameters.get(name, _MISSING)
    return getattr(fc, name) if p is _MISSING else p


class _FusedNet(nn.Module):
    """What the fused modules share: layers ``fc1 … fcL`` (:meth:`linears`), one activation per hidden layer, a
    head (log_softmax or the logits), the forward and the fused losses that fit the head."""

    log_softmax = True  # the default, also for modules pickled before the attribute existed

    def linears(self) -> list:
        """fc1 … fcL."""
        modules = self._modules  # not getattr: nn.Module.__getattr__ costs ~1 µs a name on every forward
        return [modules[name] for name in _fc_names(len(self.activations) + 1)]

    def _params(self):
        layers = self.linears()
        return [_param(fc, "weight") for fc in layers], [_param(fc, "bias") for fc in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (or, with ``log_softmax=False``, logits) of shape (*, out) for x of shape (*, in)."""
        return checked(x, *self._params(), self.activations, "log_softmax" if self.log_softmax else "logits")

    def _loss(self, method, loss, x, target, reduction, ignore_index=-100):
        if (loss == "nll") != self.log_softmax:
            head = "log-probabilities (log_softmax=True)" if self.log_softmax else "logits (log_softmax=False)"
            fits = "nll_loss" if self.log_softmax else "cross_entropy or mse_loss"
            raise ValueError(f"{type(self).__name__}.{method} does not fit this model's head: it outputs {head}; "
                             f"use {fits}")
        return checked(x, *self._params(), self.activations, "log_softmax" if self.log_softmax else "logits", loss,
                       target, reduction, ignore_index)

    def nll_loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                 ignore_index: int = -100) -> torch.Tensor:
        """``F.nll_loss(self(x), target, ...)`` with the loss fused into the last layer's kernel (a log_softmax
        model)."""
        return self._loss("nll_loss", "nll", x, target, reduction, ignore_index)

    def cross_entropy(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean",
                      ignore_index: int = -100) -> torch.Tensor:
        """``F.cross_entropy(self(x), target, ...)``, fused (a logits model)."""
        return self._loss("cross_entropy", "cross_entropy", x, target, reduction, ignore_index)

    def mse_loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``F.mse_loss(self(x), target, reduction=...)``, fused (a logits model; target of the logits' shape)."""
        return self._loss("mse_loss", "mse", x, target, reduction)


def _check_head(log_softmax) -> None:
    if not isinstance(log_softmax, bool):
        raise TypeError(f"log_softmax must be a bool, got {type(log_softmax).__name__}")


class FusedMLP(_FusedNet):
    """``log_softmax(fc2(act(fc1(x))), dim=-1)`` through the fused kernels — or the logits ``fc2(act(fc1(x)))``
    with ``log_softmax=False`` —; ``act`` is ``activation``, "relu" (the default) or "sigmoid".

    ``fc1 = nn.Linear(in_features, hidden_features, bias)`` and ``fc2 = nn.Linear(hidden_features,
    out_features, bias)`` are created in that order, so under the same ``torch.manual_seed`` the parameters,
    their names and the state_dict equal those of the nn.Linear pair (``fc1.weight``, ``fc1.bias``, ...).
    The activation and head have no parameters and are not in the state_dict. Losses: :meth:`nll_loss` for a
    log_softmax model, :meth:`cross_entropy` and :meth:`mse_loss` for a logits model.
    """

    activation = "relu"  # the default, also for FusedMLPs pickled before the attribute existed

    def __init__(self, in_features: int, hidden_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None, *, activation: str = "relu", log_softmax: bool = True) -> None:
        checks.check_activation(activation)
        _check_head(log_softmax)
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features, bias, device=device, dtype=dtype)
        self.activation, self.log_softmax = activation, log_softmax

    @classmethod
    def from_linear(cls, fc1: nn.Linear, fc2: nn.Linear, *, activation: str = "relu",
                    log_softmax: bool = True) -> "FusedMLP":
        """A FusedMLP that shares (does not copy) the Parameters of ``fc1`` and ``fc2`` (either may lack a bias)."""
        checks.check_activation(activation)
        _check_head(log_softmax)
        for name, fc in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(fc, nn.Linear):
                raise TypeError(f"{name} must be an nn.Linear, got {type(fc).__name__}")
        if fc2.in_features != fc1.out_features:
            raise ValueError(f"fc2.in_features must equal fc1.out_features ({fc1.out_features}), got {fc2.in_features}")
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.fc1, model.fc2, model.activation, model.log_softmax = fc1, fc2, activation, log_softmax
        return model

    @property
    def activations(self) -> tuple:
        return (self.activation,)

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_features

    @property
    def out_features(self) -> int:
        return self.fc2.out_features

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, bias={self.fc1.bias is not None}, activation={self.activation!r}, "
                f"log_softmax={self.log_softmax}")


class DeepFusedMLP(_FusedNet):
    """``log_softmax(fcL(act(... act(fc1(x)))))`` — or its logits with ``log_softmax=False`` —: an MLP of any
    depth through the fused kernels.

    ``DeepFusedMLP(in, h1, ..., out, activation="relu", bias=True, device=None, dtype=None, log_softmax=True)``
    makes ``fc1 = nn.Linear(in, h1, bias_1)``, ``fc2``, ... ``fcL`` in order (so the same init as the nn.Linear
    layers of an nn.Sequential under one ``torch.manual_seed``), with ``activation`` after every layer but the
    last: one name for all, or one per hidden layer; ``bias`` one bool or one per layer — the course's
    ``DeepFusedMLP(20, 13, 8, 3, activation=("relu", "sigmoid"), bias=(False, False, True), log_softmax=False)``.
    With two layers it computes what a :class:`FusedMLP` does, with the same parameter names and kernels.
    """

    def __init__(self, *features: int, activation="relu", bias=True, device=None, dtype=None,
                 log_softmax: bool = True) -> None:
        if len(features) < 3:
            raise ValueError(f"DeepFusedMLP needs in, at least one hidden and out features, got {features}")
        n_layers = len(features) - 1
        activations = (activation,) * (n_layers - 1) if isinstance(activation, str) else tuple(activation)
        if len(activations) != n_layers - 1:
            raise ValueError(f"activation must be one name or one per hidden layer ({n_layers - 1}), "
                             f"got {len(activations)}")
        for name in activations:
            checks.check_activation(name)
        biases = (bias,) * n_layers if isinstance(bias, bool) else tuple(bias)
        if len(biases) != n_layers or not all(isinstance(b, bool) for b in biases):
            raise ValueError(f"bias must be one bool or one per layer ({n_layers}), got {bias!r}")
        _check_head(log_softmax)
        super().__init__()
        for i, (n_in, n_out, b) in enumerate(zip(features, features[1:], biases), 1):
            setattr(self, f"fc{i}", nn.Linear(n_in, n_out, b, device=device, dtype=dtype))
        self.activations, self.log_softmax = activations, log_softmax

    @classmethod
    def from_linear(cls, *linears: nn.Linear, activation="relu", log_softmax: bool = True) -> "DeepFusedMLP":
        """A DeepFusedMLP whose ``fc1 … fcL`` are the given nn.Linear layers (shared, not copied), each taking the
        previous one's output."""
        if len(linears) < 2:
            raise ValueError(f"DeepFusedMLP.from_linear needs at least two nn.Linear layers, got {len(linears)}")
        for i, fc in enumerate(linears, 1):
            if not isinstance(fc, nn.Linear):
                raise TypeError(f"fc{i} must be an nn.Linear, got {type(fc).__name__}")
            if i > 1 and fc.in_features != linears[i - 2].out_features:
                raise ValueError(f"fc{i}.in_features must equal fc{i - 1}.out_features "
                                 f"({linears[i - 2].out_features}), got {fc.in_features}")
        activations = (activation,) * (len(linears) - 1) if isinstance(activation, str) else tuple(activation)
        if len(activations) != len(linears) - 1:
            raise ValueError(f"activation must be one name or one per hidden layer ({len(linears) - 1}), "
                             f"got {len(activations)}")
        for name in activations:
            checks.check_activation(name)
        _check_head(log_softmax)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        for i, fc in enumerate(linears, 1):
            setattr(model, f"fc{i}", fc)
        model.activations, model.log_softmax = activations, log_softmax
        return model

    def extra_repr(self) -> str:
        return f"activations={self.activations}, log_softmax={self.log_softmax}"
