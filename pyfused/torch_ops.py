"""The pure-torch twins of pyfused's kernel building blocks: the CPU (``PYFUSED_BACKEND=torch``) path of the
modules and of FusedTrainStep, and the tests' oracle for the kernels.

Each twin runs the ATen ops eager PyTorch runs for the same math, in the same order and layouts, into ``out=``
buffers where the caller keeps them, so the torch path rounds exactly as eager PyTorch does (the kernels, which
fuse the math, agree to rounding). Twin of each building block (:mod:`pyfused.kernels`):

=====================================  ===================================================================
kernel building block                  twin here
=====================================  ===================================================================
``layers.linear_slice`` + activation   :func:`linear` (``addmm`` / ``mm``), :func:`activate_` (relu/sigmoid)
``heads.log_softmax_rows``             :func:`log_softmax`
``heads.class_loss`` (nll / CE)        :func:`class_loss`, its gradient :func:`class_loss_grad`
``heads.squared_error`` (MSE)          :func:`mse_loss`, its gradient :func:`mse_loss_grad`
``layers.grad_slice`` + derivative     :func:`hidden_grad` (``mm`` + ``threshold_backward`` / ``sigmoid_backward``)
``gemm.tile_product`` (dW, db, dx)     :func:`weight_grad`, :func:`bias_grad`, :func:`input_grad`
``optimizers.sgd_math``                :func:`sgd_foreach` (torch.optim.SGD's foreach sequence)
``optimizers.adam_math``               :func:`adam_foreach` (torch.optim.Adam / AdamW's foreach sequence)
=====================================  ===================================================================
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_aten = torch.ops.aten
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}  # ATen's


def eager_mlp(x, weights, biases, activations, head, loss, target, reduction, ignore_index):
    """The unfused graph with torch.nn.functional, differentiable: the torch path's eager calls that need
    gradients (autograd records eager's own ops in C++; under ``torch.autocast`` its casts decide every dtype as
    they do for the nn.Linear model). Class targets of any integer dtype are taken as int64."""
    a = x
    for w, b, activation in zip(weights[:-1], biases[:-1], activations):
        a = F.linear(a, w, b)
        a = F.relu(a) if activation == "relu" else torch.sigmoid(a)
    z = F.linear(a, weights[-1], biases[-1])
    if loss == "mse":
        return F.mse_loss(z, target, reduction=reduction)
    y = F.log_softmax(z, -1) if head == "log_softmax" else z
    if loss == "none":
        return y
    fn = F.nll_loss if loss == "nll" else F.cross_entropy
    return fn(y, target if target.dtype == torch.int64 else target.long(), reduction=reduction,
              ignore_index=ignore_index)


def linear(a, w, b, out=None):
    """``a @ wᵀ + b`` as F.linear computes it for 2-D input: ``addmm`` with a bias, ``mm`` without."""
    if b is None:
        return torch.mm(a, w.t(), out=out)
    return torch.addmm(b, a, w.t(), out=out)


def activate_(h, activation):
    """The hidden activation applied to ``h`` in place (eager's ``relu`` / ``sigmoid`` values); returns h."""
    return h.relu_() if activation == "relu" else h.sigmoid_()


def linear_act(a, w, b, activation, out=None):
    """One hidden layer: ``act(a @ wᵀ + b)``."""
    return activate_(linear(a, w, b, out), activation)


def log_softmax(z, out=None):
    """``F.log_softmax(z, dim=1)``."""
    return torch._log_softmax(z, 1, False, out=out)


def class_loss(y, target, reduction, ignore_index):
    """``(loss, total_weight)``: ``F.nll_loss(y, target, ...)`` on log-probabilities (``F.cross_entropy`` is this on
    ``log_softmax(logits)``); ``total_weight`` is the number of counted rows (float, 0-dim)."""
    return _aten.nll_loss_forward(y, target, None, REDUCTION_CODES[reduction], ignore_index)


def class_loss_grad(grad, y, target, reduction, ignore_index, total_weight, dy=None, dz=None):
    """The logits' gradient of :func:`class_loss` through the log_softmax that made ``y``: eager's
    ``nll_loss_backward`` then ``_log_softmax_backward_data`` (into ``dy`` and ``dz`` when given)."""
    code = REDUCTION_CODES[reduction]
    if dy is None:
        dy = _aten.nll_loss_backward(grad, y, target, None, code, ignore_index, total_weight)
    else:
        _aten.nll_loss_backward.grad_input(grad, y, target, None, code, ignore_index, total_weight, grad_input=dy)
    return log_softmax_backward(dy, y, dz)


def log_softmax_backward(dy, y, out=None):
    """``dy − exp(y)·Σ dy``: the gradient through ``y = log_softmax(z, 1)``."""
    if out is None:
        return _aten._log_softmax_backward_data(dy, y, 1, y.dtype)
    return _aten._log_softmax_backward_data.out(dy, y, 1, y.dtype, out=out)


def mse_loss(z, target, reduction):
    """``F.mse_loss(z, target, reduction=...)``."""
    return _aten.mse_loss(z, target, REDUCTION_CODES[reduction])


def mse_loss_grad(grad, z, target, reduction, out=None):
    """The logits' gradient of :func:`mse_loss` (eager's ``mse_loss_backward``)."""
    if out is None:
        return _aten.mse_loss_backward(grad, z, target, REDUCTION_CODES[reduction])
    return _aten.mse_loss_backward.grad_input(grad, z, target, REDUCTION_CODES[reduction], grad_input=out)


def activation_backward(g, h, activation):
    """The gradient through the hidden activation from its output ``h``, written over ``g`` with ATen's own
    backward ops (eager's rounding): relu ``g ⊙ [h > 0]``, sigmoid ``g ⊙ (1 − h) ⊙ h``."""
    if activation == "relu":
        return _aten.threshold_backward.grad_input(g, h, 0, grad_input=g)
    return _aten.sigmoid_backward.grad_input(g, h, grad_input=g)


def hidden_grad(d_next, w_next, a, activation, out=None):
    """A hidden layer's pre-activation gradient: ``act'(d_next @ w_next)`` read off its output ``a``."""
    return activation_backward(torch.mm(d_next, w_next, out=out), a, activation)


def weight_grad(d, a, out=None, add=False):
    """``dW = dᵀ a`` (written, or added as AccumulateGrad adds to ``.grad``)."""
    if add:
        return out.add_(torch.mm(d.t(), a))
    return torch.mm(d.t(), a, out=out)


def bias_grad(d, out=None, add=False):
    """``db = Σ_rows d``."""
    if add:
        return out.add_(d.sum(0))
    return torch.sum(d, 0, out=out)


def input_grad(d, w):
    """``dx = d @ w``."""
    return torch.mm(d, w)


def row_partials(dz, a, block_m, bias=True):
    """The last layer's gradient per block of ``block_m`` rows (:func:`pyfused.kernels.rows.rows`'
    ``row_partials``): ``(R, out·n + out)``, each row ``dz_bᵀ a_b`` flattened then ``Σ_rows dz_b`` (zeros without
    a bias: the kernel leaves them unwritten), in the dtype of ``dz``."""
    rows, out, n = dz.shape[0], dz.shape[1], a.shape[1]
    blocks = -(-rows // block_m)
    pad = blocks * block_m - rows
    dzb = torch.cat([dz, dz.new_zeros(pad, out)]).view(blocks, block_m, out)
    ab = torch.cat([a, a.new_zeros(pad, n)]).view(blocks, block_m, n).to(dz.dtype)
    sums = dzb.sum(1) if bias else dz.new_zeros(blocks, out)
    return torch.cat([torch.bmm(dzb.transpose(1, 2), ab).reshape(blocks, out * n), sums], 1)


def row_pass(x, weights, biases, activations, loss, target, block_m, ignore_index=-100):
    """The train step's row pass (:func:`pyfused.kernels.rows.rows` with a loss), from the twins above, in x's
    dtype: ``acts`` (each hidden layer's output), ``dpres`` (their pre-activation gradients), ``dz`` (the logits'
    gradient of the summed loss, unscaled), ``stats`` (per block of ``block_m`` rows: Σ loss and the counted
    rows — class — or elements — mse) and ``out`` (log-probabilities, or logits for mse). ``loss``: "class" or
    "mse"; class targets int64."""
    acts, a = [], x
    for w, b, activation in zip(weights[:-1], biases[:-1], activations):
        a = linear_act(a, w, b, activation)
        acts.append(a)
    z = linear(a, weights[-1], biases[-1])
    rows, one = x.shape[0], torch.ones((), dtype=x.dtype, device=x.device)
    if loss == "class":
        out = log_softmax(z)
        value = class_loss(out, target, "none", ignore_index)[0]
        dz = class_loss_grad(torch.ones(rows, dtype=x.dtype, device=x.device), out, target, "none", ignore_index,
                             one)
        counted = (target != ignore_index).to(x.dtype)
    else:
        out, value = z, mse_loss(z, target, "none").sum(1)
        dz = mse_loss_grad(one, z, target, "sum")
        counted = torch.full((rows,), float(z.shape[1]), dtype=x.dtype, device=x.device)
    dpres, d = [None] * len(acts), dz
    for i in reversed(range(len(acts))):
        d = dpres[i] = hidden_grad(d, weights[i + 1], acts[i], activations[i])
    blocks = torch.arange(rows, device=x.device) // block_m
    sums = [torch.zeros(-(-rows // block_m), dtype=x.dtype, device=x.device).index_add(0, blocks, v)
            for v in (value, counted)]
    return dict(acts=acts, dpres=dpres, dz=dz, stats=torch.stack(sums, 1), out=out)


def sgd_foreach(params, grads, buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch.optim.SGD's foreach update, in the parameter dtype; new momentum buffers are put in ``buffers``."""
    owned = maximize or weight_decay != 0
    if maximize:
        grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            torch._foreach_add_(grads, params, alpha=weight_decay)
    elif weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if all(buf is not None for buf in buffers):
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads, alpha=1 - dampening)
        else:
            for i, (buf, grad) in enumerate(zip(buffers, grads)):
                if buf is None:
                    buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        if nesterov and owned:
            torch._foreach_add_(grads, buffers, alpha=momentum)
        elif nesterov:
            grads = torch._foreach_add(grads, buffers, alpha=momentum)
        else:
            grads = buffers
    if isinstance(lr, torch.Tensor):
        torch._foreach_addcmul_(params, grads, [lr] * len(params), value=-1)
    else:
        torch._foreach_add_(params, grads, alpha=-lr)


def adam_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
                 weight_decay, amsgrad, maximize, decoupled):
    """torch.optim.Adam's foreach update without capturable (AdamW: ``decoupled``), in the parameter dtype; the
    float32 ``steps`` are incremented. Reads each step on the host (as torch does): CPU tensors here. Complex
    tensors are updated as their real views, as torch does. A tensor ``lr`` rounds as torch's tensor-lr Adam does
    (its step size and decoupled decay are tensor ops in lr's dtype)."""
    real = lambda ts: [None if t is None else torch.view_as_real(t) if t.is_complex() else t for t in ts]  # noqa: E731
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs = map(real, (params, grads, exp_avgs, exp_avg_sqs,
                                                                        max_exp_avg_sqs))
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(steps, 1)
    if weight_decay != 0:
        if decoupled:
            factor = 1 - lr * weight_decay
            torch._foreach_mul_(params, float(factor) if isinstance(factor, torch.Tensor) else factor)
        elif maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    counts = [float(step) for step in steps]
    step_size = [float((lr / (1 - beta1 ** t)) * -1) for t in counts]
    bias2_sqrt = [(1 - beta2 ** t) ** 0.5 for t in counts]
    if amsgrad:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denom = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)
