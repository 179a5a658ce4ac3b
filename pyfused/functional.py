"""The fused MLP ops: any depth, a log_softmax or logits head, and the NLL, cross-entropy and MSE losses fused
into the last layer's kernel (their logit gradient made in the forward pass).

Every op validates its arguments and calls :func:`fused`. On the kernels, eager calls with gradients go through
:class:`FusedFunction` (a ``torch.autograd.Function`` over :class:`pyfused.engines.KernelEngine`;
:class:`TransformableFusedFunction` under torch.func transforms); on the torch path they record eager's own ops
(:func:`pyfused.torch_ops.eager_mlp`). Inference goes straight to the engine's forward (nothing is kept), and
under ``torch.compile`` the engine runs behind the opaque ``torch.library`` ops of :mod:`pyfused.custom_ops`.

Weights are in nn.Linear layout (``w_i`` of shape ``(out_i, in_i)``, any strides), biases may be None; ``x`` has
shape ``(*, in)``. Launches: forward 1, backward 2, for any depth (:mod:`pyfused.engines`).
"""
from __future__ import annotations

import torch

from pyfused import backend, checks, torch_ops
from pyfused.engines import Spec


DOUBLE_BACKWARD = (
    "pyfused's fused backward is not differentiable: double backward (create_graph=True, or a gradient of a "
    "gradient) is not supported; compute higher-order gradients through the unfused model (pyfused.unfuse(model), "
    "or an nn.Sequential of the same nn.Linear layers)")


def _wrapped(*tensors) -> bool:
    """Whether a torch.func transform (grad, vmap, …) wraps any of ``tensors``: such calls go through
    :class:`TransformableFusedFunction`, whose setup_context and vmap rule the transforms use (the engines take
    plain tensors)."""
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _vmap_by_slices(function, info, in_dims, args):
    """A vmap rule: ``function.apply`` on each slice of the batched arguments, the outputs stacked at dim 0 (one
    fused call per slice, so batched weights — an ensemble — work too)."""
    outs = []
    for b in range(info.batch_size):
        sliced = [a.select(d, b) if isinstance(d, int) else a for a, d in zip(args, in_dims)]
        outs.append(function.apply(*sliced))
    stacked = tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*outs))
    return stacked, tuple(None if t is None else 0 for t in stacked)


def _save(ctx, inputs, out, saved) -> None:
    x, target, spec, *params = inputs
    ctx.spec = spec
    saved = list(saved)
    if spec.kind == "none":  # the backward starts from the output itself
        saved[-2] = out
    ctx.save_for_backward(x, target, *params[0::2], *saved)


def _backward(ctx, dout, *_):
    x, target, *rest = ctx.saved_tensors
    n_layers = len(ctx.spec.has_bias)
    needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:])
    weights, saved = rest[:n_layers], rest[n_layers:]
    if torch.is_grad_enabled():  # create_graph=True (torch.func.grad too): a node that refuses differentiation
        grads = FusedBackward.apply(x, target, ctx.spec, needs, dout, n_layers, *weights, *saved)
    else:
        grads = backend.engine_for(x, weights[-1]).backward(x, weights, target, saved, dout, ctx.spec, needs)
    return (grads[0], None, None, *grads[1:])


class FusedFunction(torch.autograd.Function):
    """``engine.forward`` / ``engine.backward`` for 2-D x; ``params`` are (w_1, b_1, …, w_L, b_L); returns the
    result. The eager calls' Function: the forward takes ``ctx`` (a Function with setup_context costs ~10 µs more
    per call), so torch.func transforms go through :class:`TransformableFusedFunction` instead."""

    @staticmethod
    def forward(ctx, x, target, spec, *params):
        out, saved = backend.engine_for(x, params[-2]).forward(x, params[0::2], params[1::2], target, spec, True)
        _save(ctx, (x, target, spec, *params), out, saved)
        return out

    backward = staticmethod(_backward)


class TransformableFusedFunction(torch.autograd.Function):
    """:class:`FusedFunction` for torch.func (grad, vmap, …): the outputs are the result, then the saved tensors
    (non-differentiable), and setup_context saves them. Under vmap, a batched x (and target) with unbatched
    parameters and a row-wise result is folded into the rows (one call); anything else runs slice by slice."""

    @staticmethod
    def forward(x, target, spec, *params):
        out, saved = backend.engine_for(x, params[-2]).forward(x, params[0::2], params[1::2], target, spec, True)
        return (out, *saved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(*output[1:])
        _save(ctx, inputs, output[0], output[1:])

    backward = staticmethod(_backward)

    @staticmethod
    def vmap(info, in_dims, x, target, spec, *params):
        x_dim, target_dim = in_dims[0], in_dims[1]
        row_wise = spec.kind == "none" or spec.reduction == "none"
        if not row_wise or any(isinstance(d, int) for d in in_dims[3:]) or x_dim is None:
            return _vmap_by_slices(TransformableFusedFunction, info, in_dims, (x, target, spec, *params))
        x = x.movedim(x_dim, 0)
        batch, n_rows = x.shape[0], x.shape[1]
        x = x.reshape(batch * n_rows, x.shape[-1])
        if target is not None:
            target = target.expand(batch, *target.shape) if target_dim is None else target.movedim(target_dim, 0)
            target = target.reshape(batch * n_rows, *target.shape[2:])
        out, *saved = TransformableFusedFunction.apply(x, target, spec, *params)
        outs = [out.view(batch, n_rows, *out.shape[1:])]
        for t in saved:  # row tensors, and the empty placeholders of the result-free slots
            outs.append(t.view(batch, n_rows, *t.shape[1:]) if t.dim() and t.shape[0] == batch * n_rows
                        else t.expand(batch, *t.shape))
        return tuple(outs), (0,) * len(outs)


class FusedBackward(torch.autograd.Function):
    """``engine.backward`` as a graph node, for backward passes that record a graph (``create_graph=True``,
    torch.func.grad): its own backward raises :data:`DOUBLE_BACKWARD`."""

    @staticmethod
    def forward(x, target, spec, needs, dout, n_layers, *tensors):
        weights, saved = tensors[:n_layers], tensors[n_layers:]
        return backend.engine_for(x, weights[-1]).backward(x, weights, target, saved, dout, spec, needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD)

    @staticmethod
    def vmap(info, in_dims, *args):
        return _vmap_by_slices(FusedBackward, info, in_dims, args)


def autocast_dtype(x):
    """The dtype ``torch.autocast`` gives F.linear on x's device type, None when autocast is off there."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_out_dtype(device_type, amp, head, loss):
    """The dtype of the unfused graph's result under autocast to ``amp``: the losses (nll_loss, cross_entropy,
    mse_loss) are on autocast's float32 list on CPU and CUDA; log_softmax is on CUDA's only (amp on CPU); logits are
    a linear layer's output (amp)."""
    if loss != "none" or (head == "log_softmax" and device_type != "cpu"):
        return torch.float32
    return amp


def _cast(t, amp):
    """``t`` as autocast casts it for F.linear (:func:`pyfused.checks.autocast_cast`)."""
    return t if t is None or checks.autocast_cast(t, amp) == t.dtype else t.to(amp)


def fused(x, weights, biases, activations, *, head="log_softmax", loss="none", target=None, reduction="mean",
          ignore_index=-100):
    """The fused MLP on validated arguments: the head's output ``(*, out)`` without a loss, else the loss
    (reduced, or of target's shape for "none", or of the logits' shape for MSE "none").

    Under ``torch.autocast``, x, the weights and the biases are cast as F.linear's autocast casts them (a graph
    node: the gradients reach the float32 parameters in float32), the layers run in the autocast dtype and the
    result has the dtype autocast gives the unfused graph's head or loss (:func:`autocast_out_dtype`); the torch
    path runs eager's own graph under autocast (:func:`pyfused.torch_ops.eager_mlp`)."""
    amp = autocast_dtype(x)
    out_dtype = None
    if amp is not None:
        x, weights, biases = _cast(x, amp), [_cast(w, amp) for w in weights], [_cast(b, amp) for b in biases]
        out_dtype = autocast_out_dtype(x.device.type, amp, head, loss)
        if not backend.use_triton(x.device, x.dtype, weights[-1].shape[0]):
            return _shaped(_eager(x.reshape(-1, x.shape[-1]), weights, biases, activations, head, loss,
                                  _flat_target(target, loss, weights), reduction, ignore_index),
                           x, target, loss, reduction, weights[-1].shape[0])
        out_dtype = None if out_dtype == x.dtype or x.dtype != amp else out_dtype  # float64 stays float64
    spec = Spec(tuple(activations), tuple(b is not None for b in biases), head, loss, reduction, ignore_index,
                out_dtype)
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    flat_target = _flat_target(target, loss, weights)
    if torch.compiler.is_compiling():
        from pyfused import custom_ops

        out = custom_ops.call(flat, flat_target, weights, biases, spec)
        out = out if out_dtype is None else out.to(out_dtype)
    else:
        transformed = torch._C._are_functorch_transforms_active() and _wrapped(x, target, *weights, *biases)
        grad = transformed or (torch.is_grad_enabled() and (
            x.requires_grad or _any_requires_grad(weights) or _any_requires_grad(biases)))
        if not grad:  # inference: the forward alone, nothing kept (a Function's needs_input_grad ignores no_grad)
            out = backend.engine_for(x, weights[-1]).forward(flat, weights, biases, flat_target, spec, False)[0]
        elif not backend.use_triton(x.device, x.dtype, weights[-1].shape[0]):
            # the torch path: eager's own ops, recorded by autograd (and torch.func) natively — the same bits as
            # the engine's twins behind a Function, ~30 µs sooner per step; double backward and every transform work
            out = _eager(flat, weights, biases, activations, head, loss, flat_target, reduction, ignore_index)
        elif transformed:
            params = [t for pair in zip(weights, biases) for t in pair]
            out = TransformableFusedFunction.apply(flat, flat_target, spec, *params)[0]
        else:
            params = [t for pair in zip(weights, biases) for t in pair]
            out = FusedFunction.apply(flat, flat_target, spec, *params)
    return _shaped(out, x, target, loss, reduction, weights[-1].shape[0])


def _eager(x, weights, biases, activations, head, loss, target, reduction, ignore_index):
    """:func:`pyfused.torch_ops.eager_mlp` with the kernels' error for a class target out of range."""
    try:
        return torch_ops.eager_mlp(x, weights, biases, activations, head, loss, target, reduction, ignore_index)
    except IndexError:
        if loss in ("nll", "cross_entropy"):
            checks.check_target_range(target, weights[-1].shape[0], ignore_index)
        raise


def _any_requires_grad(tensors) -> bool:
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def _flat_target(target, loss, weights):
    if target is None or target.dim() == (2 if loss == "mse" else 1):
        return target
    return target.reshape(-1, weights[-1].shape[0]) if loss == "mse" else target.reshape(-1)


def _shaped(out, x, target, loss, reduction, n_out):
    if loss == "none":
        return out if x.dim() == 2 else out.view(*x.shape[:-1], n_out)
    return out.view(target.shape) if reduction == "none" and target.dim() != out.dim() else out


def _check_net(x, weights, biases, activations) -> None:
    checks.check_layers(x, weights, biases, autocast_dtype(x))
    for activation in activations:
        checks.check_activation(activation)


def _check_loss(x, weights, loss, target, reduction, ignore_index) -> None:
    if loss == "mse":
        checks.check_mse_target(x, target, weights[-1].shape[0], reduction, autocast_dtype(x))
    else:
        checks.check_target(x, target, weights[-1].shape[0], reduction, ignore_index)


def fused_mlp(x, w1, b1, w2, b2, activation="relu", *, log_softmax=True):
    """``log_softmax(act(x @ w1ᵀ + b1) @ w2ᵀ + b2, dim=-1)`` for ``x`` of shape (*, in), fused; with
    ``log_softmax=False`` the logits ``act(x @ w1ᵀ + b1) @ w2ᵀ + b2``. ``act`` is ``activation``, "relu" or
    "sigmoid". Returns (*, out) in x's dtype; differentiable in x, w1, b1, w2, b2."""
    return checked(x, (w1, w2), (b1, b2), (activation,), "log_softmax" if log_softmax else "logits")


def fused_mlp_nll(x, w1, b1, w2, b2, target, reduction="mean", ignore_index=-100, activation="relu"):
    """``F.nll_loss(fused_mlp(x, ...).reshape(-1, out), target.reshape(-1), reduction, ignore_index)``, fused.

    The logit gradient is made in the forward pass. ``reduction="none"`` returns target's shape, with 0 for
    ignored rows; ``"mean"`` divides by the number of non-ignored rows (NaN when there are none, as in torch).
    A CPU target out of range raises IndexError; on CUDA its row's loss is NaN (the host never reads targets).
    """
    return checked(x, (w1, w2), (b1, b2), (activation,), "log_softmax", "nll", target, reduction, ignore_index)


def fused_mlp_cross_entropy(x, w1, b1, w2, b2, target, reduction="mean", ignore_index=-100, activation="relu"):
    """``F.cross_entropy(fused_mlp(x, ..., log_softmax=False).reshape(-1, out), target.reshape(-1), ...)``: the
    class loss on the logits, fused (the same math as :func:`fused_mlp_nll` on the log-probabilities)."""
    return checked(x, (w1, w2), (b1, b2), (activation,), "logits", "cross_entropy", target, reduction,
                   ignore_index)


def fused_mlp_mse(x, w1, b1, w2, b2, target, reduction="mean", activation="relu"):
    """``F.mse_loss(fused_mlp(x, ..., log_softmax=False), target, reduction=...)``, fused: ``target`` is a float
    tensor of the logits' shape (*, out); "mean" divides by its number of elements, "none" returns its shape."""
    return checked(x, (w1, w2), (b1, b2), (activation,), "logits", "mse", target, reduction)


def fused_deep_mlp(x, weights, biases, activations, target=None, reduction="mean", ignore_index=-100, *,
                   log_softmax=True, loss=None):
    """An MLP of L = len(weights) ≥ 2 nn.Linear layers with ``activations[i]`` after layer i + 1 (L − 1 of them,
    each "relu" or "sigmoid"), ``biases[i]`` None where absent: the log-probabilities (or the logits with
    ``log_softmax=False``) of shape (*, out); with ``target``, the loss instead — ``loss`` "nll" (the default of
    a log_softmax head), "cross_entropy" (the default of a logits head) or "mse" — reduced as asked. One
    forward launch and two backward launches whatever L (``pyfused::mlp`` under torch.compile)."""
    weights, biases, activations = tuple(weights), tuple(biases), tuple(activations)
    if len(weights) < 2 or len(biases) != len(weights) or len(activations) != len(weights) - 1:
        raise ValueError(f"need L >= 2 weights, L biases (None allowed) and L - 1 activations, got "
                         f"{len(weights)}, {len(biases)} and {len(activations)}")
    head = "log_softmax" if log_softmax else "logits"
    if target is None:
        if loss is not None:
            raise ValueError(f"loss={loss!r} needs a target")
        return checked(x, weights, biases, activations, head)
    loss = loss or ("nll" if log_softmax else "cross_entropy")
    checks.check_choice("loss", loss, checks.LOSSES)
    if (loss == "nll") != log_softmax:
        raise ValueError(f"loss={loss!r} does not fit a {head} head: nll takes log-probabilities "
                         "(log_softmax=True), cross_entropy and mse the logits (log_softmax=False)")
    return checked(x, weights, biases, activations, head, loss, target, reduction, ignore_index)


def checked(x, weights, biases, activations, head, loss="none", target=None, reduction="mean", ignore_index=-100):
    """:func:`fused` after the checks of the call (layers, activations, target, reduction), for a loss known to
    fit the head: the modules' forward and losses, and :func:`fused_deep_mlp`."""
    _check_net(x, weights, biases, activations)
    if loss != "none":
        _check_loss(x, weights, loss, target, reduction, ignore_index)
    return fused(x, weights, biases, activations, head=head, loss=loss, target=target, reduction=reduction,
                 ignore_index=ignore_index)
