"""The two engines behind every fused op of a module: the Triton kernels and the pure-torch twins, one interface.

``engine.forward(x, weights, biases, target, spec, keep)`` returns ``(out, saved)``: the head's output (or the
reduced loss) and, with ``keep``, what the backward needs — ``saved = (a_1, …, a_{L−1}, g, count)``, the hidden
activations, then ``g`` (with a loss — the kernels: the unscaled logit gradient made in the forward; the twins:
the log-probabilities or logits from which eager's backward ops start —, without one an empty placeholder: the
caller passes the output itself in its place to the backward, an output cannot be returned twice) and ``count``
(the counted rows of a mean class loss, 0-dim; else empty). The structure is the same for both engines, so the
``torch.library`` op (:mod:`pyfused.custom_ops`) has one fake. ``engine.backward(x, weights, target, saved,
dout, spec, needs)`` returns ``(dx, dw_1, db_1, …, dw_L, db_L)``, None where ``needs`` (the 2L + 1 flags of x and
the parameters) is False.

Launches, for L layers: forward 1 (:func:`pyfused.kernels.rows.rows`), backward 2 (the row pass, then one grouped
gradient launch, :func:`pyfused.kernels.grads.grads`), whatever the depth, loss or head; a loss reduction adds
one or two small torch ops (sums of the per-block statistics).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pyfused import checks, cpu_gemm, torch_ops


class Spec(NamedTuple):
    """What a fused call computes: one activation per hidden layer, a bias flag per layer, the head
    ("log_softmax" or "logits"), the loss ("none", "nll", "cross_entropy", "mse"), its reduction and ignore_index;
    ``out_dtype``: the result's dtype where it is not x's (under autocast: a float32 log_softmax or loss of
    16-bit layers; the kernels only)."""

    activations: tuple
    has_bias: tuple
    head: str = "log_softmax"
    loss: str = "none"
    reduction: str = "mean"
    ignore_index: int = -100
    out_dtype: torch.dtype | None = None

    @property
    def kind(self) -> str:
        """The loss's math: "class" for nll and cross-entropy (the same on log-probabilities), "mse", "none"."""
        return "class" if self.loss in ("nll", "cross_entropy") else self.loss


def _float(dtype):
    return torch.promote_types(dtype, torch.float32)


def backward_scale(spec: Spec, dout, count, numel):
    """The factor of each element of the unscaled logit gradient: the incoming gradient under the reduction (per
    row or element for "none", divided by the counted rows — at least 1, so zero counted rows give zero
    gradients, as in torch — or by the elements for "mean")."""
    dout = dout.to(_float(dout.dtype))
    if spec.reduction != "mean":
        return dout
    return dout / count.clamp(min=1) if spec.kind == "class" else dout / numel


def _needed_layers(needs, n_layers):
    """(per-layer flags: some parameter of the layer needs a gradient; the lowest layer whose pre-activation
    gradient is needed, n_layers when none)."""
    need_w = [needs[1 + 2 * i] or needs[2 + 2 * i] for i in range(n_layers)]
    lowest = 0 if needs[0] else next((i for i, n in enumerate(need_w) if n), n_layers)
    return need_w, lowest


class KernelEngine:
    """The Triton kernels (CUDA, or the interpreter on CPU)."""

    def forward(self, x, weights, biases, target, spec: Spec, keep: bool):
        if spec.kind == "class":  # CPU targets (the interpreter) out of range: IndexError, before any launch
            checks.check_target_range(target, weights[-1].shape[0], spec.ignore_index)
        if x.shape[0] == 0:
            return TorchEngine().forward(x, weights, biases, target, spec, keep)
        from pyfused.kernels import rows

        n_rows, n_out = x.shape[0], weights[-1].shape[0]
        new = lambda *s, dtype=x.dtype: torch.empty(s, device=x.device, dtype=dtype)  # noqa: E731
        acts = [new(n_rows, w.shape[0]) for w in weights[:-2]] + [new(n_rows, weights[-2].shape[0]) if keep else None]
        kind, empty = spec.kind, x.new_empty(0)
        out = loss_out = stats = dz = None
        if kind == "none":
            out = new(n_rows, n_out, dtype=spec.out_dtype or x.dtype)
        elif spec.reduction == "none":
            loss_out = new(*((n_rows,) if kind == "class" else (n_rows, n_out)), dtype=_float(x.dtype))
        else:
            widths = (x.shape[1], *(w.shape[0] for w in weights))
            stats = new(rows.n_row_blocks(n_rows, widths, x.dtype, backward=False, device=x.device), 2,
                        dtype=_float(x.dtype))
        if keep and kind != "none":
            dz = new(n_rows, n_out)
        rows.rows(x, weights, biases, spec.activations, head=spec.head, loss=kind, target=target,
                  ignore_index=spec.ignore_index, acts=acts, out=out, loss_out=loss_out, stats=stats, dz=dz,
                  store_last=keep)
        count = empty
        if kind == "none":
            value = out
        elif spec.reduction == "none":
            value = loss_out
        else:  # the row blocks' sums (fresh tensors: the op's outputs may not be views)
            total = stats[:, 0].sum()
            if spec.reduction == "sum":
                value = total
            elif kind == "class":
                count = stats[:, 1].sum()
                value = total / count
            else:
                value = total / (n_rows * n_out)
        saved = (*acts, x.new_empty(0) if kind == "none" else dz, count) if keep else ()  # no output twice
        return value.to(spec.out_dtype or x.dtype), saved

    def backward(self, x, weights, target, saved, dout, spec: Spec, needs):
        n_layers = len(weights)
        if x.shape[0] == 0:
            return TorchEngine().backward(x, weights, target, saved, dout, spec, needs)
        from pyfused.kernels import grads, rows

        acts, g, count = list(saved[:n_layers - 1]), saved[n_layers - 1], saved[n_layers]
        need_w, lowest = _needed_layers(needs, n_layers)
        if lowest == n_layers:
            return (None,) * len(needs)
        n_rows, n_out = x.shape[0], weights[-1].shape[0]
        new = lambda *s: torch.empty(s, device=x.device, dtype=x.dtype)  # noqa: E731
        if spec.kind == "none":
            grad = dict(grad_in="dy", g=dout, y=g if spec.head == "log_softmax" else None)
        else:
            grad = dict(grad_in="dlogits", g=g, scale=backward_scale(spec, dout, count, n_rows * n_out))
        dz = new(n_rows, n_out)
        dpres = [new(n_rows, w.shape[0]) if i >= lowest else None for i, w in enumerate(weights[:-1])]
        rows.rows(x, weights, [None] * n_layers, spec.activations, head=spec.head, acts=acts,
                  dpres=dpres if lowest < n_layers - 1 else None, dz=dz, forward=False, lowest=lowest, **grad)
        outs = []
        for i, w in enumerate(weights):
            outs += [new(*w.shape) if need_w[i] else None,
                     new(w.shape[0]) if need_w[i] and spec.has_bias[i] else None]
        dx = new(*x.shape) if needs[0] else None
        grads.grads(x, weights, acts, dpres + [dz], need=need_w, has_bias=spec.has_bias, grads=outs, dx=dx)
        return (dx, *(t if need else None for t, need in zip(outs, needs[1:])))


class TorchEngine:
    """The pure-torch twins (:mod:`pyfused.torch_ops`): eager's own ATen ops, in eager's order — in the forward
    the large float32 CPU products on oneDNN under ``PYFUSED_BACKEND=auto`` (:mod:`pyfused.cpu_gemm`). This forward
    is the torch path's inference, and under torch.compile the custom op's forward; eager calls with gradients
    record eager's own graph instead (:func:`pyfused.functional.fused`)."""

    def forward(self, x, weights, biases, target, spec: Spec, keep: bool):
        acts, a = [], x
        for w, b, act in zip(weights[:-1], biases[:-1], spec.activations):
            a = cpu_gemm.linear_act(a, w, b, act, None)
            acts.append(a)
        z = cpu_gemm.linear(a, weights[-1], biases[-1], None)
        kind, count = spec.kind, x.new_empty(0)
        if kind == "none":
            value, g = torch_ops.log_softmax(z) if spec.head == "log_softmax" else z, x.new_empty(0)
        elif kind == "class":
            g = torch_ops.log_softmax(z)
            try:  # ATen checks the range (free here); the IndexError then names the target as the kernels' does
                value, total = torch_ops.class_loss(g, target.long(), spec.reduction, spec.ignore_index)
            except IndexError:
                checks.check_target_range(target, weights[-1].shape[0], spec.ignore_index)
                raise
            if spec.reduction == "mean":
                count = total.to(_float(x.dtype))  # the kernels' count dtype (one fake for both engines)
        else:
            g = z
            value = torch_ops.mse_loss(z, target, spec.reduction)
        return value, ((*acts, g, count) if keep else ())

    def backward(self, x, weights, target, saved, dout, spec: Spec, needs):
        n_layers = len(weights)
        acts, g, count = list(saved[:n_layers - 1]), saved[n_layers - 1], saved[n_layers]
        need_w, lowest = _needed_layers(needs, n_layers)
        if lowest == n_layers:
            return (None,) * len(needs)
        if spec.kind == "none":
            dz = torch_ops.log_softmax_backward(dout, g) if spec.head == "log_softmax" else dout
        elif spec.kind == "class":
            total = count.to(g.dtype) if spec.reduction == "mean" else torch.ones((), dtype=g.dtype, device=g.device)
            dz = torch_ops.class_loss_grad(dout, g, target.long(), spec.reduction, spec.ignore_index, total)
        else:
            dz = torch_ops.mse_loss_grad(dout, g, target, spec.reduction)
        d = [None] * (n_layers - 1) + [dz]
        for i in reversed(range(lowest, n_layers - 1)):
            d[i] = torch_ops.hidden_grad(d[i + 1], weights[i + 1], acts[i], spec.activations[i])
        inputs = [x, *acts]
        grads = []
        for i in range(n_layers):
            grads += [torch_ops.weight_grad(d[i], inputs[i]) if needs[1 + 2 * i] else None,
                      torch_ops.bias_grad(d[i]) if needs[2 + 2 * i] else None]
        dx = torch_ops.input_grad(d[0], weights[0]) if needs[0] else None
        return (dx, *grads)
