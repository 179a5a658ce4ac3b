"""``torch.library`` registration of the fused ops, for ``torch.compile(fullgraph=True)`` and ``opcheck``.

``pyfused::mlp``, ``pyfused::mlp_nll`` and ``pyfused::mlp_backward`` (and ``pyfused::deep_mlp`` with
``pyfused::deep_mlp_backward`` for more layers) are opaque custom ops with fake (meta) implementations and
autograd formulas; their real implementations call the same backend functions as
the eager autograd.Functions of :mod:`pyfused.functional`. Inputs are 2-D ``x`` (rows, in).
The backward op returns all five gradients; those not asked for come back as empty tensors (a custom op
cannot return None).
"""
from typing import Optional

import torch
from torch import Tensor

from pyfused import backend
from pyfused.functional import deep_backward, deep_forward, mlp_backward, nll_forward, row_scale


@torch.library.custom_op("pyfused::mlp", mutates_args=())
def mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
        activation: str) -> tuple[Tensor, Tensor]:
    """(y, h): log-probabilities and the hidden activations saved for backward."""
    y, h, _, _ = backend.mlp_ops(x.device, x.dtype).mlp_forward(x, w1, b1, w2, b2, activation=activation)
    return y, h


@mlp.register_fake
def _(x, w1, b1, w2, b2, activation):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0])


@torch.library.custom_op("pyfused::mlp_nll", mutates_args=())
def mlp_nll(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], target: Tensor,
            ignore_index: int, reduction: str, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss in x's dtype, logit gradient, h, count of counted rows — an empty tensor unless "mean")."""
    loss, dlogits, h, count = nll_forward(backend.mlp_ops(x.device, x.dtype), x, w1, b1, w2, b2, target,
                                          ignore_index, reduction, True, activation)
    return loss.to(x.dtype), dlogits, h, x.new_empty(0, dtype=torch.int64) if count is None else count


@mlp_nll.register_fake
def _(x, w1, b1, w2, b2, target, ignore_index, reduction, activation):
    rows = x.shape[0]
    loss = x.new_empty(rows if reduction == "none" else ())
    count = x.new_empty(() if reduction == "mean" else 0, dtype=torch.int64)
    return loss, x.new_empty(rows, w2.shape[0]), x.new_empty(rows, w1.shape[0]), count


@torch.library.custom_op("pyfused::mlp_backward", mutates_args=())
def mlp_backward_op(x: Tensor, w1: Tensor, w2: Tensor, h: Tensor, g: Tensor, y_or_scale: Tensor, loss: bool,
                    needs: list[bool], has_b1: bool, has_b2: bool,
                    activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dw1, db1, dw2, db2); ``g, y_or_scale`` are ``dlogits, scale`` when ``loss`` else ``dy, y``."""
    grad = dict(dlogits=g, scale=y_or_scale) if loss else dict(dy=g, y=y_or_scale)
    grads = mlp_backward(backend.mlp_ops(x.device, x.dtype), x, w1, w2, h, needs, has_b1, has_b2, activation,
                         **grad)
    return tuple(x.new_empty(0) if t is None else t for t in grads)


@mlp_backward_op.register_fake
def _(x, w1, w2, h, g, y_or_scale, loss, needs, has_b1, has_b2, activation):
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    first, second = need_w1 or need_b1, need_w2 or need_b2
    shapes = (x.shape if need_x else (0,), w1.shape if first else (0,), (w1.shape[0],) if first and has_b1 else (0,),
              w2.shape if second else (0,), (w2.shape[0],) if second and has_b2 else (0,))
    return tuple(x.new_empty(s) for s in shapes)


def _needs(ctx):
    return list(ctx.needs_input_grad[:5])


def _grads(ctx, dx, dw1, db1, dw2, db2):
    """The op's empties back to None for the inputs that need no gradient."""
    return tuple(t if need else None for t, need in zip((dx, dw1, db1, dw2, db2), ctx.needs_input_grad[:5]))


def _mlp_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, activation = inputs
    ctx.has_b1, ctx.has_b2, ctx.activation = b1 is not None, b2 is not None, activation
    ctx.save_for_backward(x, w1, w2, output[1], output[0])


def _mlp_backward(ctx, dy, _dh):
    x, w1, w2, h, y = ctx.saved_tensors
    grads = mlp_backward_op(x, w1, w2, h, dy, y, False, _needs(ctx), ctx.has_b1, ctx.has_b2, ctx.activation)
    return (*_grads(ctx, *grads), None)


def _nll_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, _, _, reduction, activation = inputs
    ctx.has_b1, ctx.has_b2, ctx.mean = b1 is not None, b2 is not None, reduction == "mean"
    ctx.activation = activation
    ctx.save_for_backward(x, w1, w2, output[2], output[1], output[3])


def _nll_backward(ctx, dloss, _ddlogits, _dh, _dcount):
    x, w1, w2, h, dlogits, count = ctx.saved_tensors
    scale = row_scale(dloss, count if ctx.mean else None)
    grads = mlp_backward_op(x, w1, w2, h, dlogits, scale, True, _needs(ctx), ctx.has_b1, ctx.has_b2,
                            ctx.activation)
    return (*_grads(ctx, *grads), None, None, None, None)


mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup)
mlp_nll.register_autograd(_nll_backward, setup_context=_nll_setup)


# ---------------------------------------------------------------- MLPs of any depth (DeepFusedMLP)
# Absent biases are empty tensors and the activations one comma-separated string: a list of optional tensors
# or of strings does not pass through the op's autograd as a flat list of tensors.

@torch.library.custom_op("pyfused::deep_mlp", mutates_args=())
def deep_mlp(x: Tensor, target: Optional[Tensor], ignore_index: int, reduction: str, activations: str,
             weights: list[Tensor], biases: list[Tensor]) -> tuple[Tensor, Tensor, Tensor, list[Tensor], Tensor]:
    """(out, h, logit gradient — empty without target —, outputs of layers 1..L−2, count — empty unless a
    "mean" loss): :func:`pyfused.functional.deep_forward`, for L ≥ 3 layers."""
    if len(weights) < 3:
        raise ValueError(f"pyfused::deep_mlp takes 3 or more layers (use pyfused::mlp), got {len(weights)}")
    out, h, g, xs, count = deep_forward(backend.mlp_ops(x.device, x.dtype), x, target, ignore_index, reduction,
                                        activations.split(","), weights, [b if b.numel() else None for b in biases],
                                        True)
    return (out, h, x.new_empty(0) if target is None else g, xs[1:],
            x.new_empty(0, dtype=torch.int64) if count is None else count)


@deep_mlp.register_fake
def _(x, target, ignore_index, reduction, activations, weights, biases):
    rows, n_out = x.shape[0], weights[-1].shape[0]
    if target is None:
        out = x.new_empty(rows, n_out)
    else:
        out = x.new_empty(rows if reduction == "none" else ())
    count = x.new_empty(() if target is not None and reduction == "mean" else 0, dtype=torch.int64)
    return (out, x.new_empty(rows, weights[-2].shape[0]), x.new_empty(0 if target is None else (rows, n_out)),
            [x.new_empty(rows, w.shape[0]) for w in weights[:-2]], count)


@torch.library.custom_op("pyfused::deep_mlp_backward", mutates_args=())
def deep_mlp_backward(dout: Tensor, h: Tensor, g: Tensor, xs: list[Tensor], weights: list[Tensor], count: Tensor,
                      loss: bool, activations: str, has_bias: list[bool], needs: list[bool]) -> list[Tensor]:
    """[dx, dw1, db1, ..., dwL, dbL] (empty tensors for those not made): :func:`~pyfused.functional.deep_backward`;
    ``needs`` are the flags of (x, w1, b1, ..., wL, bL)."""
    grads = deep_backward(backend.mlp_ops(h.device, h.dtype), dout, h, g, xs, weights,
                          count if count.dim() == 0 else None, loss, activations.split(","), has_bias, needs[0],
                          needs[1:])
    return [h.new_empty(0) if t is None else t for t in grads]


@deep_mlp_backward.register_fake
def _(dout, h, g, xs, weights, count, loss, activations, has_bias, needs):
    shapes = [xs[0].shape if needs[0] else (0,)]
    for i, w in enumerate(weights):
        made = needs[1 + 2 * i] or needs[2 + 2 * i]
        shapes += [w.shape if made else (0,), (w.shape[0],) if made and has_bias[i] else (0,)]
    return [h.new_empty(s) for s in shapes]


def _deep_setup(ctx, inputs, output):
    x, target, _, _, activations, weights, biases = inputs
    out, h, g, hidden, count = output
    ctx.loss, ctx.activations = target is not None, activations
    ctx.has_bias = [b.numel() > 0 for b in biases]
    ctx.needs = [x.requires_grad] + [t.requires_grad for pair in zip(weights, biases) for t in pair]
    ctx.save_for_backward(h, g if ctx.loss else out, count, x, *hidden, *weights)


def _deep_backward(ctx, dout, _dh, _dg, _dhidden, _dcount):
    h, g, count, *rest = ctx.saved_tensors
    n_layers = len(ctx.has_bias)
    xs, weights = rest[:n_layers - 1], rest[n_layers - 1:]
    grads = deep_mlp_backward(dout, h, g, list(xs), list(weights), count, ctx.loss, ctx.activations, ctx.has_bias,
                              ctx.needs)
    dx, dws, dbs = grads[0], grads[1::2], grads[2::2]
    # a list input takes a list of tensors back: zeros (never used) for the parameters that need no gradient
    dws = [dw if dw.numel() else torch.zeros_like(w) for dw, w in zip(dws, weights)]
    dbs = [db if db.numel() or not has else db.new_zeros(w.shape[0]) for db, w, has in zip(dbs, weights, ctx.has_bias)]
    return dx if ctx.needs[0] else None, None, None, None, None, dws, dbs


deep_mlp.register_autograd(_deep_backward, setup_context=_deep_setup)
