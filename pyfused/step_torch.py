"""The torch path of :class:`pyfused.train_step.FusedTrainStep` (CPU, or ``PYFUSED_BACKEND=torch``).

The ATen ops eager autograd and the torch optimizers run — the twins of :mod:`pyfused.torch_ops` — in the same
order and layouts, into buffers kept between calls, without autograd and without dx. Under ``PYFUSED_BACKEND=torch``
that is the same rounding: parameters are bit-identical to the eager loop's, also over whole accumulation groups (a
flushed partial group is rescaled by k/r: equal to rounding), and a 10-epoch run of the seed follows eager
PyTorch's losses to ~1e-10 relative. Under the default ``auto`` the large float32 GEMMs run on oneDNN instead of
MKL (:mod:`pyfused.cpu_gemm`: about half the time on the seed's two large products), which agrees with eager to
float32 rounding; like any rounding difference it grows over a long run (10 epochs of the seed: 5e-4 relative in
the losses). Writing the gradient GEMM straight into the weight or momentum buffer (``addmm_``) was tried too: it
saves one elementwise op, and drifts as much (4.6e-4).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyfused import cpu_gemm, torch_ops


class TorchStepPath:
    """One FusedTrainStep's torch-path workspaces and steps (``step``: the FusedTrainStep, for its model,
    optimizer binding, gradient buffer and options)."""

    def __init__(self, step) -> None:
        self.step = step
        self._ws = None  # the workspace of the last batch size
        self._detached = None
        self._one = torch.ones((), dtype=step.dtype, device=step.device)

    def _aliases(self):
        """Detached aliases of (w_1, b_1, …, w_L, b_L): in-place ops on them update the parameters without
        autograd, with no grad-mode switch per step."""
        params = self.step.params
        aliases = self._detached
        if aliases is None or any(a is not None and a.data_ptr() != p.data_ptr() for a, p in zip(aliases, params)):
            self.step.check_params()
            aliases = self._detached = [None if p is None else p.detach() for p in params]
        return aliases

    def _workspace(self, rows):
        ws = self._ws
        if ws is None or ws["z"].shape[0] != rows:
            new = lambda n: torch.empty((rows, n), dtype=self.step.dtype, device=self.step.device)  # noqa: E731
            widths = self.step.widths
            numel = torch.full((), float(rows * widths[-1]), dtype=torch.promote_types(self.step.dtype, torch.float32),
                               device=self.step.device)  # the MSE divisor, kept on the device
            ws = self._ws = dict(acts=[new(n) for n in widths[1:-1]], d=[new(n) for n in widths[1:-1]],
                                 z=new(widths[-1]), y=new(widths[-1]), dy=new(widths[-1]), dz=new(widths[-1]),
                                 numel=numel)
        return ws

    def _forward(self, x, target):
        """Hidden activations, logits (and log-probabilities for a class loss) into the workspace; returns (x and
        target as the ops take them, workspace)."""
        s, aliases = self.step, self._aliases()
        ws = self._workspace(x.shape[0])
        x = x.detach() if x.requires_grad else x
        a = x
        acts = ws["acts"]
        for i, act in enumerate(s.activations):
            a = acts[i] = cpu_gemm.linear_act(a, aliases[2 * i], aliases[2 * i + 1], act, acts[i])
        ws["z"] = cpu_gemm.linear(a, aliases[-2], aliases[-1], ws["z"])
        if s.kind == "class":
            torch_ops.log_softmax(ws["z"], out=ws["y"])
            target = target if target.dtype == torch.int64 else target.long()
        return x, target, ws

    def _loss(self, target, reduction, ws):
        """(loss, count): the loss under ``reduction`` and its divisor (counted rows, or elements)."""
        s = self.step
        if s.kind == "class":
            return torch_ops.class_loss(ws["y"], target, reduction, s.ignore_index)
        return torch_ops.mse_loss(ws["z"], target, reduction), ws["numel"]

    def _rows(self, grad, target, count, reduction, ws):
        """The logit gradient of ``grad`` · the loss under ``reduction`` (eager's backward ops), then every hidden
        layer's pre-activation gradient, into the workspace."""
        s, aliases = self.step, self._aliases()
        if s.kind == "class":
            d = torch_ops.class_loss_grad(grad, ws["y"], target, reduction, s.ignore_index, count, dy=ws["dy"],
                                          dz=ws["dz"])
        else:
            d = torch_ops.mse_loss_grad(grad, ws["z"], target, reduction, out=ws["dz"])
        for i in reversed(range(len(ws["acts"]))):
            d = ws["d"][i] = cpu_gemm.hidden_grad(d, aliases[2 * i + 2], ws["acts"][i], s.activations[i], ws["d"][i])

    def _grads(self, x, ws, first, kept=True):
        """dW_i = D_iᵀ A_i, db_i = Σ D_i from the workspace into the flat gradient's views: written (``first``) or
        added, as AccumulateGrad adds to ``.grad``. Returns the gradients: the views, except, when they need not be
        ``kept`` (a step that neither accumulates nor keeps ``.grad``), a weight gradient oneDNN made (no copy)."""
        views = list(self.step.grad_views())
        inputs, pres = [x, *ws["acts"]], [*ws["d"], ws["dz"]]
        for i, (a, d) in enumerate(zip(inputs, pres)):
            views[2 * i] = cpu_gemm.weight_grad(d, a, views[2 * i], not first, kept)
            if views[2 * i + 1] is not None:
                torch_ops.bias_grad(d, out=views[2 * i + 1], add=not first)
        return views

    def step_once(self, x, target):
        """The ATen ops of the eager step (no autograd, no dx), then the optimizer; returns the loss."""
        s = self.step
        x, target, ws = self._forward(x, target)
        loss, count = self._loss(target, s.reduction, ws)
        self._rows(self._one, target, count, s.reduction, ws)
        self.update(self._grads(x, ws, True, s.keep_grad))
        return loss

    def accumulate(self, x, target, first, sums=None):
        """This batch's gradient of its loss divided by accumulation_steps, written (``first``) or added into the
        gradient sums (the gradient views; ``sums`` is the kernel path's argument); returns the loss. With a
        process group the mean is over every rank's rows: (Σ loss, count), in float32 at least so that 16-bit sums
        neither overflow nor round the count, is all-reduced before the gradients are scaled."""
        s = self.step
        x, target, ws = self._forward(x, target)
        total, count = self._loss(target, "sum", ws)
        totals = torch.stack((total, count.to(total.dtype)))
        if totals.dtype not in (torch.float32, torch.float64):
            totals = totals.float()
        if s.process_group is not None:
            dist.all_reduce(totals, group=s.process_group)
        inv_k = self._one if s.accumulation_steps == 1 else self._one / s.accumulation_steps
        if s.reduction == "sum":
            self._rows(inv_k, target, count, "sum", ws)
        elif s.kind == "class":  # eager's mean backward, over the (all-reduced) count
            self._rows(inv_k, target, totals[1].to(s.dtype), "mean", ws)
        elif s.process_group is None:  # eager's mean squared error backward
            self._rows(inv_k, target, count, "mean", ws)
        else:  # the mean over every rank's elements: to rounding
            self._rows(inv_k / totals[1].to(s.dtype), target, count, "sum", ws)
        self._grads(x, ws, first)
        return (totals[0] / totals[1] if s.reduction == "mean" else totals[0]).to(s.dtype)

    def update(self, grads) -> None:
        """The optimizer's foreach update of the parameters from ``grads`` (w_1, b_1, …), param group by group."""
        s, aliases, binding = self.step, self._aliases(), self.step.binding
        by_group = {}  # id(group) -> (group, indices)
        for i, p in enumerate(s.params):
            if p is not None:
                by_group.setdefault(id(binding.groups[i]), (binding.groups[i], []))[1].append(i)
        state = binding.optimizer.state
        for group, index in by_group.values():
            ps, gs = [aliases[i] for i in index], [grads[i] for i in index]
            lr = group["lr"]
            lr = float(lr) if isinstance(lr, torch.Tensor) and lr.device.type == "cpu" else lr
            if binding.kind == "sgd":
                momentum = group["momentum"]
                bufs = [state[s.params[i]].get("momentum_buffer") for i in index] if momentum != 0 else []
                torch_ops.sgd_foreach(ps, gs, bufs, lr=lr, momentum=momentum, dampening=group["dampening"],
                                      weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                                      maximize=group["maximize"])
                for i, buf in zip(index, bufs):
                    state[s.params[i]]["momentum_buffer"] = buf
                continue
            states = [binding.states(i, "cpu") for i in index]
            beta1, beta2 = group["betas"]
            torch_ops.adam_foreach(ps, gs, [t[0] for t in states], [t[1] for t in states], [t[2] for t in states],
                                   [t[3] for t in states], lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                                   weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                                   maximize=group["maximize"], decoupled=binding.decoupled(group))
