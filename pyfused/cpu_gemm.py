"""The GEMMs of the torch path's own passes on CPU (FusedTrainStep; a module's inference): oneDNN for the large
float32 ones, eager's ATen ops otherwise.

Eager PyTorch runs a float32 ``nn.Linear`` on CPU, and its backward, through MKL (``addmm`` / ``mm``). oneDNN,
which torch ships for its CPU backends (``torch.ops.mkldnn._linear_pointwise``: the op torch.compile's CPU
backend calls for frozen linears), runs the seed step's two large GEMMs (128×784 by 784×128, and the weight
gradient 128×128 by 128×784) in about half MKL's time on the AMD EPYC of ``bench/results/amd-epyc`` (~77 against
~150 µs each, 2 threads); below ~2²¹ multiply-adds its fixed cost (~15 µs) loses to MKL. The two agree to float32
rounding, not bit for bit (the forward's order of summation over the 784 inputs differs).

Which one runs (:func:`takes`): under ``PYFUSED_BACKEND=auto`` (the default), oneDNN for float32 CPU GEMMs of at
least :data:`MIN_MACS` multiply-adds, where torch has oneDNN; eager's ATen op otherwise. ``PYFUSED_BACKEND=torch``
always runs eager's ATen ops: the step then rounds exactly as the eager loop does, bit for bit (the twins of
:mod:`pyfused.torch_ops` stay eager's, as the tests' oracle).

The activation is never fused into oneDNN's epilogue: its relu maps NaN to 0, where ``torch.relu`` keeps it.
"""
from __future__ import annotations

import functools

import torch

from pyfused import backend, torch_ops

# below this oneDNN's per-call cost loses to MKL (measured, µs MKL / oneDNN: 8×784×128 (0.8 M) 19.7 / 21.6,
# 32×784×128 (3.2 M) 44.6 / 32.8, 64×1000×100 (6.4 M) 85.6 / 63.2)
MIN_MACS = 1 << 21


@functools.cache
def available() -> bool:
    """Whether this torch build has oneDNN's dense linear (``torch.ops.mkldnn._linear_pointwise``)."""
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._linear_pointwise.default is not None
    except (AttributeError, RuntimeError):
        return False


def takes(a: torch.Tensor, n: int) -> bool:
    """Whether ``a @ bᵀ`` with ``b`` of ``n`` rows runs on oneDNN (see the module's docstring; never when empty,
    nor with oneDNN switched off: ``torch.backends.mkldnn.flags(enabled=False)``)."""
    return (a.device.type == "cpu" and a.dtype == torch.float32 and a.shape[0] * a.shape[1] * n >= max(MIN_MACS, 1)
            and backend.requested() == "auto" and available() and torch.backends.mkldnn.enabled)


def _abt(a, b, bias=None):
    """``a @ bᵀ (+ bias)`` on oneDNN (a new contiguous tensor). Strided ``a`` and ``b`` are taken as they are; the
    bias is made contiguous (oneDNN reads it as if it were)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, None if bias is None else bias.contiguous(), "none", [], "")


def linear_act(a, w, b, activation, out):
    """One hidden layer ``act(a @ wᵀ + b)``: into ``out`` (:func:`pyfused.torch_ops.linear_act`), or a new tensor
    from oneDNN. Returns the result."""
    if takes(a, w.shape[0]):
        return torch_ops.activate_(_abt(a, w, b), activation)
    return torch_ops.linear_act(a, w, b, activation, out=out)


def linear(a, w, b, out):
    """The output layer ``a @ wᵀ + b``, as :func:`linear_act` without the activation."""
    if takes(a, w.shape[0]):
        return _abt(a, w, b)
    return torch_ops.linear(a, w, b, out=out)


def hidden_grad(d_next, w_next, a, activation, out):
    """A hidden layer's pre-activation gradient ``act'(d_next @ w_next)`` (:func:`pyfused.torch_ops.hidden_grad`);
    returns it (``out`` or a new tensor)."""
    if takes(d_next, w_next.shape[1]):
        return torch_ops.activation_backward(_abt(d_next, w_next.t()), a, activation)
    return torch_ops.hidden_grad(d_next, w_next, a, activation, out=out)


def weight_grad(d, a, out, add, kept=True):
    """``dW = dᵀ a`` written into ``out`` (or added to it, ``add``), as :func:`pyfused.torch_ops.weight_grad`;
    returns it. Unless it must be ``kept`` in ``out``, oneDNN's new tensor is returned instead of copied."""
    if takes(d.t(), a.shape[1]):
        g = _abt(d.t(), a.t())
        return out.add_(g) if add else out.copy_(g) if kept else g
    return torch_ops.weight_grad(d, a, out=out, add=add)
