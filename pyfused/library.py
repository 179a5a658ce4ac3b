"""``torch.library`` registration of the fused ops, for ``torch.compile(fullgraph=True)`` and ``opcheck``.

``pyfused::mlp``, ``pyfused::mlp_nll`` and ``pyfused::mlp_backward`` are opaque custom ops with fake
(meta) implementations and autograd formulas; their real implementations call the same backend functions as
the eager autograd.Functions of :mod:`pyfused.functional`. Inputs are 2-D ``x`` (rows, in).
The backward op returns all five gradients; those not asked for come back as empty tensors (a custom op
cannot return None).
"""
from typing import Optional

import torch
from torch import Tensor

from pyfused import backend
from pyfused.functional import mlp_backward, nll_forward, row_scale


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
