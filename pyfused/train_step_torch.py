"""The torch path of :class:`pyfused.train_step.FusedTrainStep` (CPU, or ``PYFUSED_BACKEND=torch``).

The ATen ops eager autograd and torch.optim.SGD would run, in the same order and layouts, into buffers kept
between calls, without autograd and without dx: so the same rounding. Parameters are bit-identical to eager's,
also over whole accumulation groups (a flushed partial group is rescaled by k/r: equal to rounding), and a
10-epoch run of the seed follows eager PyTorch's losses to ~1e-10 relative. Writing the gradient GEMM straight
into the weight or momentum buffer (``addmm_``) would save one elementwise op but rounds differently: over 10
epochs of the seed the losses drifted apart by 4.6e-4 relative, so it is not done.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyfused.optim import _foreach_sgd
from pyfused.reference import activate_, activation_backward

_aten = torch.ops.aten
_MEAN, _SUM = 1, 2  # ATen's reduction codes


class TorchStepPath:
    """FusedTrainStep's torch-path methods; they use its state (parameters, groups, optimizer, buffers)."""

    def _aliases(self):
        """Detached aliases of (w1, b1, w2, b2) and the transposes of w1, w2: in-place ops on them update the
        parameters without autograd, with no grad-mode switch per step."""
        aliases = self._detached
        if aliases is None or aliases[0].data_ptr() != self.params[0].data_ptr() \
                or aliases[2].data_ptr() != self.params[2].data_ptr():
            if any(p is not None and (p.dtype != self.dtype or p.device != self.device) for p in self.params):
                raise RuntimeError("the model's parameters changed dtype or device since FusedTrainStep was made; "
                                   "make a new one")
            w1, b1, w2, b2 = (None if p is None else p.detach() for p in self.params)
            aliases = self._detached = (w1, b1, w2, b2, w1.t(), w2.t())
        return aliases

    def _torch_forward(self, x, target):
        """h = act(x @ w1ᵀ + b1), z = h @ w2ᵀ + b2 and y = log_softmax(z) with ATen ops into the workspace
        (kept for the next call of the same batch size); returns (x and target as the ops take them,
        workspace)."""
        w1, b1, w2, b2, w1t, w2t = self._aliases()
        rows = x.shape[0]
        ws = self._torch_ws
        if ws is None or ws[0].shape[0] != rows:
            new = lambda *s: torch.empty(s, dtype=self.dtype, device=self.device)  # noqa: E731
            h, z, y, dy, dz, dh = (new(rows, n) for n in (w1.shape[0], *(w2.shape[0],) * 4, w1.shape[0]))
            ws = self._torch_ws = (h, z, y, dy, dz, dh, dh.t(), dz.t())
        h, z, y = ws[:3]
        x = x.detach() if x.requires_grad else x
        target = target if target.dtype == torch.int64 else target.long()
        activate_(torch.addmm(b1, x, w1t, out=h) if self.bias else torch.mm(x, w1t, out=h), self.activation)
        torch.addmm(b2, h, w2t, out=z) if self.bias else torch.mm(h, w2t, out=z)
        torch._log_softmax(z, 1, False, out=y)
        return x, target, ws

    def _torch_rows(self, grad, target, count, reduction, ws):
        """dz = (softmax − onehot) · (the nll gradient of ``grad`` under ``reduction``) and
        dh = act'(dz @ w2) (from h), into the workspace."""
        h, _, y, dy, dz, dh = ws[:6]
        w2 = self._aliases()[2]
        _aten.nll_loss_backward.grad_input(grad, y, target, None, reduction, self.ignore_index, count, grad_input=dy)
        _aten._log_softmax_backward_data.out(dy, y, 1, y.dtype, out=dz)
        activation_backward(torch.mm(dz, w2, out=dh), h, self.activation)

    def _torch_step(self, x, target):
        """The ATen ops of the eager step (no autograd, no dx), then SGD; returns the loss."""
        x, target, ws = self._torch_forward(x, target)
        loss, total = _aten.nll_loss_forward(ws[2], target, None, _MEAN, self.ignore_index)
        self._torch_rows(self._one, target, total, _MEAN, ws)
        self._foreach_update(self._torch_grads(x, ws, True))
        return loss

    def _torch_accumulate(self, x, target, first):
        """:meth:`_accumulate` with eager's ATen ops: the nll sum and count (all-reduced; in float32 at least,
        so that 16-bit sums neither overflow nor round the count), the mean's gradient scaled by 1/k as
        ``(loss / k).backward()`` makes it, and the gradients written (``first``) or added."""
        x, target, ws = self._torch_forward(x, target)
        nll, count = _aten.nll_loss_forward(ws[2], target, None, _SUM, self.ignore_index)
        totals = torch.stack((nll, count))
        if totals.dtype not in (torch.float32, torch.float64):
            totals = totals.float()
        if self.process_group is not None:
            dist.all_reduce(totals, group=self.process_group)
        inv_k = self._one if self.accumulation_steps == 1 else self._one / self.accumulation_steps
        self._torch_rows(inv_k, target, totals[1].to(self.dtype), _MEAN, ws)
        self._torch_grads(x, ws, first)
        return (totals[0] / totals[1]).to(self.dtype)

    def _torch_grads(self, x, ws, first):
        """dW1 = dhᵀx, db1 = Σ dh, dW2 = dzᵀh, db2 = Σ dz from the workspace into the flat gradient's views:
        written (``first``) or added, as AccumulateGrad adds to ``.grad``. Returns the views."""
        h, _, _, _, dz, dh, dh_t, dz_t = ws
        grads = self._grad_buffer()[1]
        for w, b, operands, rows in ((0, 1, (dh_t, x), dh), (2, 3, (dz_t, h), dz)):
            torch.mm(*operands, out=grads[w]) if first else grads[w].add_(torch.mm(*operands))
            if self.bias:
                torch.sum(rows, 0, out=grads[b]) if first else grads[b].add_(rows.sum(0))
        return grads

    def _foreach_update(self, grads) -> None:
        """torch's foreach SGD of the parameters from ``grads`` (w1, b1, w2, b2), param group by param group."""
        aliases = self._aliases()
        by_group = {}  # id(group) -> (group, indices, params, grads)
        for i, p in enumerate(self.params):
            if p is None:
                continue
            group = self.groups[i]
            lists = by_group.setdefault(id(group), (group, [], [], []))
            for lst, item in zip(lists[1:], (i, aliases[i], grads[i])):
                lst.append(item)
        state = self.optimizer.state
        for group, index, ps, gs in by_group.values():
            lr, momentum = group["lr"], group["momentum"]
            lr = float(lr) if isinstance(lr, torch.Tensor) and lr.device.type == "cpu" else lr
            bufs = [state[self.params[i]].get("momentum_buffer") for i in index] if momentum != 0 else []
            _foreach_sgd(ps, gs, bufs, lr=lr, momentum=momentum, dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"])
            for i, buf in zip(index, bufs):
                state[self.params[i]]["momentum_buffer"] = buf
