"""Input validation, once, at the public entry points: clear errors that name the argument, before any launch.

The error classes derive from both the natural Python type and ``RuntimeError``, the type PyTorch's own ops
raise for the same mistakes (``F.linear`` with mismatched shapes or dtypes), so code written against either
catches them.
"""
import torch

REDUCTIONS = ("mean", "sum", "none")
ACTIVATIONS = ("relu", "sigmoid")  # the hidden activations of the kernels (pyfused.kernels.activation)
HEADS = ("log_softmax", "logits")
LOSSES = ("nll", "cross_entropy", "mse")


class ShapeError(ValueError, RuntimeError):
    """A tensor has the wrong shape for its place."""


class DTypeError(TypeError, RuntimeError):
    """A tensor has the wrong dtype for its place."""


class DeviceError(ValueError, RuntimeError):
    """Tensors that must share a device do not."""


def _tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_activation(activation) -> None:
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str, one of {ACTIVATIONS}, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_mlp(x, w1, b1, w2, b2) -> None:
    """Check ``fused_mlp``'s arguments: x (*, in) floating; w1 (hidden, in); w2 (out, hidden); b1 (hidden,)
    and b2 (out,) or None; one dtype and one device for all."""
    check_layers(x, (w1, w2), (b1, b2))


def autocast_cast(t, amp):
    """The dtype autocast to ``amp`` gives ``t`` for F.linear (``amp`` None: autocast off): floating-point tensors
    but float64 take ``amp``."""
    if amp is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return amp


def _layers_ok(x, weights, biases, amp) -> bool:
    """:func:`check_layers`'s happy path in one pass (a few µs less per call); False sends it to the checks that
    name the first mistake."""
    tensor = torch.Tensor
    if not isinstance(x, tensor) or not x.is_floating_point() or x.dim() == 0:
        return False
    dtype, device, n = autocast_cast(x, amp), x.device, x.shape[-1]
    for w, b in zip(weights, biases):
        if (not isinstance(w, tensor) or w.dim() != 2 or w.shape[1] != n or w.device != device
                or (w.dtype if amp is None else autocast_cast(w, amp)) != dtype):
            return False
        n = w.shape[0]
        if b is not None and (not isinstance(b, tensor) or b.dim() != 1 or b.shape[0] != n or b.device != device
                              or (b.dtype if amp is None else autocast_cast(b, amp)) != dtype):
            return False
    return True


def check_layers(x, weights, biases, amp=None) -> None:
    """Check a chain of layers: x (*, in) floating; weights w1..wL in nn.Linear layout, each taking the previous
    one's output; biases b1..bL of shape (out_i,) or None; one dtype and one device for all (the dtypes autocast to
    ``amp`` makes of them, under autocast)."""
    if _layers_ok(x, weights, biases, amp):
        return
    names = [f"w{i}" for i in range(1, len(weights) + 1)]
    _tensor("x", x)
    for name, w in zip(names, weights):
        _tensor(name, w)
    if not x.is_floating_point():
        raise DTypeError(f"x must be a floating-point tensor, got {x.dtype}")
    for name, w in zip(names, weights):
        if w.dim() != 2:
            raise ShapeError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(w.shape)}")
    w1 = weights[0]
    if x.dim() == 0 or x.shape[-1] != w1.shape[1]:
        raise ShapeError(f"x must have shape (*, {w1.shape[1]}) to match w1 {tuple(w1.shape)}, got {tuple(x.shape)}")
    for i in range(1, len(weights)):
        prev, w = weights[i - 1], weights[i]
        if w.shape[1] != prev.shape[0]:
            raise ShapeError(f"{names[i]} must have shape (out, {prev.shape[0]}) to match {names[i - 1]} "
                             f"{tuple(prev.shape)}, got {tuple(w.shape)}")
    for i, (w, b) in enumerate(zip(weights, biases), 1):
        if b is not None:
            _tensor(f"b{i}", b)
            if tuple(b.shape) != (w.shape[0],):
                raise ShapeError(f"b{i} must have shape ({w.shape[0]},), got {tuple(b.shape)}")
    for i, (w, b) in enumerate(zip(weights, biases), 1):
        for name, t in ((f"w{i}", w), (f"b{i}", b)):
            if t is None:
                continue
            if autocast_cast(t, amp) != autocast_cast(x, amp):
                after = " under autocast" if amp is not None else ""
                raise DTypeError(f"{name} must have x's dtype{after} {autocast_cast(x, amp)}, got "
                                 f"{autocast_cast(t, amp)}")
            if t.device != x.device:
                raise DeviceError(f"{name} must be on x's device {x.device}, got {t.device}")


def check_target(x, target, n_out, reduction, ignore_index) -> None:
    """Check the loss arguments: target integer with shape x.shape[:-1] on x's device, a known reduction."""
    _tensor("target", target)
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise DTypeError(f"target must hold integer class indices, got {target.dtype}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ShapeError(f"target must have shape {tuple(x.shape[:-1])} (x's leading dims), got {tuple(target.shape)}")
    if target.device != x.device:
        raise DeviceError(f"target must be on x's device {x.device}, got {target.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def check_mse_target(x, target, n_out, reduction, amp=None) -> None:
    """Check F.mse_loss's target: floating point, x's dtype (any floating dtype under autocast, which computes
    mse_loss in float32) and device, the logits' shape (x.shape[:-1] + (out,))."""
    _tensor("target", target)
    expected = (*x.shape[:-1], n_out)
    if not target.is_floating_point():
        raise DTypeError(f"target must be a floating-point tensor like the logits, got {target.dtype}")
    if target.dtype != x.dtype and amp is None:
        raise DTypeError(f"target must have x's dtype {x.dtype}, got {target.dtype}")
    if tuple(target.shape) != expected:
        raise ShapeError(f"target must have the logits' shape {expected}, got {tuple(target.shape)}")
    if target.device != x.device:
        raise DeviceError(f"target must be on x's device {x.device}, got {target.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if target.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("pyfused's fused MSE does not differentiate its target; detach the target, or use "
                           "F.mse_loss(model(x), target) for a target that needs a gradient")


def check_choice(name, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_target_range(target, n_out, ignore_index) -> None:
    """IndexError for a CPU target outside [0, n_out) that is not ignore_index (free: no device sync).
    CUDA targets are not read on the host: the kernel makes their loss NaN instead."""
    if target.device.type != "cpu" or target.numel() == 0:
        return
    low, high = torch.aminmax(target)
    if low >= 0 and high < n_out:
        return
    bad = ((target < 0) | (target >= n_out)) & (target != ignore_index)
    if bad.any():
        value = int(target[bad][0])
        raise IndexError(f"target {value} is out of bounds for {n_out} classes (ignore_index={ignore_index})")
