"""The hidden layer's activation in the fused kernels, chosen by the constexpr ``ACTIVATION``
(one of :data:`pyfused.checks.ACTIVATIONS`).

Forward, from the pre-activation ``a`` (fp32 accumulator): ``relu(a) = max(a, 0)``, ``sigmoid(a) = 1 / (1 + e^−a)``.
Backward, from the activation's *output* ``h`` (what the forward saves, so no pre-activation is kept) and the
incoming gradient ``g``: relu ``g ⊙ [h > 0]``; sigmoid ``g ⊙ (1 − h) ⊙ h`` (PyTorch's ``sigmoid_backward``).
NaN and ±Inf propagate as in PyTorch's relu, sigmoid and their backward ops.
"""
import triton
import triton.language as tl


@triton.jit
def activate(a, ACTIVATION: tl.constexpr):
    """The activation of the fp32 pre-activation tile ``a``."""
    if ACTIVATION == "sigmoid":
        h = tl.sigmoid(a)
    else:  # NaN-propagating max (plain tl.maximum returns 0 for NaN): relu(NaN) is NaN, as in PyTorch
        h = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return h


@triton.jit
def activation_grad(g, h, ACTIVATION: tl.constexpr):
    """The gradient through the activation: ``g`` (fp32) times the derivative read off the output ``h``."""
    if ACTIVATION == "sigmoid":
        hf = h.to(g.dtype)
        d = g * (1.0 - hf) * hf
    else:  # PyTorch's threshold_backward: 0 where h <= 0, g elsewhere (NaN h included)
        d = tl.where(h <= 0, 0.0, g)
    return d
