"""``torch.library`` registration of the fused ops, for ``torch.compile(fullgraph=True)`` and ``opcheck``.

``pyfused::mlp`` runs the engine's forward (:mod:`pyfused.engines`: any depth, head and loss) and returns the
output and the saved tensors; ``pyfused::mlp_backward`` runs the engine's backward and returns every gradient,
empty where none is made (a custom op cannot return None). Both are opaque to the compiler, with fake (meta)
implementations; their real implementations are the engines the eager :class:`pyfused.functional.FusedFunction`
calls. Absent biases are empty tensors and the activations one comma-separated string: lists of optional tensors
or of strings do not pass through an op's autograd (measured with a scratch op).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from pyfused import backend
from pyfused.engines import Spec


def _spec(activations, biases, head, loss, reduction, ignore_index) -> Spec:
    acts = tuple(activations.split(",")) if activations else ()
    return Spec(acts, tuple(b.numel() > 0 for b in biases), head, loss, reduction, ignore_index)


def _count_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


@torch.library.custom_op("pyfused::mlp", mutates_args=())
def mlp(x: Tensor, target: Optional[Tensor], weights: list[Tensor], biases: list[Tensor], activations: str,
        head: str, loss: str, reduction: str, ignore_index: int) -> tuple[Tensor, list[Tensor]]:
    """(output or loss, saved tensors of the backward: hidden activations, g, count)."""
    spec = _spec(activations, biases, head, loss, reduction, ignore_index)
    out, saved = backend.engine_for(x, weights[-1]).forward(x, weights, [b if b.numel() else None for b in biases],
                                                           target, spec, True)
    return out, list(saved)


@mlp.register_fake
def _(x, target, weights, biases, activations, head, loss, reduction, ignore_index):
    spec = _spec(activations, biases, head, loss, reduction, ignore_index)
    rows, n_out = x.shape[0], weights[-1].shape[0]
    if spec.kind == "none":
        out = x.new_empty(rows, n_out)
    elif reduction == "none":
        out = x.new_empty(rows) if spec.kind == "class" else x.new_empty(rows, n_out)
    else:
        out = x.new_empty(())
    mean_class = spec.kind == "class" and reduction == "mean"
    count = x.new_empty((), dtype=_count_dtype(x)) if mean_class else x.new_empty(0)
    g = x.new_empty(0) if spec.kind == "none" else x.new_empty(rows, n_out)
    return out, [*(x.new_empty(rows, w.shape[0]) for w in weights[:-1]), g, count]


@torch.library.custom_op("pyfused::mlp_backward", mutates_args=())
def mlp_backward(x: Tensor, target: Optional[Tensor], weights: list[Tensor], saved: list[Tensor], dout: Tensor,
                 activations: str, head: str, loss: str, reduction: str, ignore_index: int, has_bias: list[bool],
                 needs: list[bool]) -> list[Tensor]:
    """[dx, dw_1, db_1, …, dw_L, db_L], empty tensors for those not made (``needs``: the flags of x and each
    parameter)."""
    spec = Spec(tuple(activations.split(",")), tuple(has_bias), head, loss, reduction, ignore_index)
    grads = backend.engine_for(x, weights[-1]).backward(x, weights, target, saved, dout, spec, needs)
    return [x.new_empty(0) if g is None else g for g in grads]


@mlp_backward.register_fake
def _(x, target, weights, saved, dout, activations, head, loss, reduction, ignore_index, has_bias, needs):
    shapes = [x.shape if needs[0] else (0,)]
    for i, w in enumerate(weights):
        shapes += [w.shape if needs[1 + 2 * i] else (0,), (w.shape[0],) if needs[2 + 2 * i] else (0,)]
    return [x.new_empty(s) for s in shapes]


def _setup(ctx, inputs, output):
    x, target, weights, biases, activations, head, loss, reduction, ignore_index = inputs
    ctx.args = (activations, head, loss, reduction, ignore_index)
    ctx.has_bias = [b.numel() > 0 for b in biases]
    ctx.needs = [x.requires_grad] + [t.requires_grad for pair in zip(weights, biases) for t in pair]
    saved = list(output[1])
    if loss == "none":  # the backward starts from the output itself
        saved[-2] = output[0]
    ctx.save_for_backward(x, target, *weights, *saved)


def _backward(ctx, dout, _dsaved):
    x, target, *rest = ctx.saved_tensors
    n_layers = len(ctx.has_bias)
    weights = rest[:n_layers]
    grads = mlp_backward(x, target, list(weights), list(rest[n_layers:]), dout, *ctx.args, ctx.has_bias, ctx.needs)
    dws, dbs = grads[1::2], grads[2::2]
    # a list input takes a list of tensors back: zeros (never used) for the parameters that need no gradient
    dws = [dw if dw.numel() or not w.numel() else torch.zeros_like(w) for dw, w in zip(dws, weights)]
    dbs = [db if db.numel() or not has else db.new_zeros(w.shape[0]) for db, w, has in zip(dbs, weights, ctx.has_bias)]
    return (grads[0] if ctx.needs[0] else None), None, dws, dbs, None, None, None, None, None


mlp.register_autograd(_backward, setup_context=_setup)


def call(x, target, weights, biases, spec: Spec):
    """``pyfused::mlp`` for validated 2-D arguments; the output (or loss)."""
    return mlp(x, target, list(weights), [x.new_empty(0) if b is None else b for b in biases],
               ",".join(spec.activations), spec.head, spec.loss, spec.reduction, spec.ignore_index)[0]
