"""The fused MLP ops: ``fused_mlp`` and ``fused_mlp_nll``.

Each op is a ``torch.autograd.Function`` over 2-D inputs whose forward and backward call the backend's
functions (:func:`pyfused.backend.mlp_ops`: Triton launchers or their pure-torch twins). Under
``torch.compile`` the same functions run behind the opaque ``torch.library`` ops of :mod:`pyfused.library`,
so a compiled graph has no breaks; eager calls skip the op registry's overhead and go straight to the
Function.

The loss op reduces inside itself; its backward turns the incoming gradient into the factor of every row
(:func:`row_scale`) that multiplies the logit gradient made in the forward.
"""
import torch

from pyfused import backend, checks


def mlp_backward(ops, x, w1, w2, h, needs, has_b1, has_b2, activation, dx_activation=None, **grad):
    """(dx, dw1, db1, dw2, db2) from the backend ``ops``; ``grad`` is ``dy=, y=`` or ``dlogits=, scale=``.
    ``needs`` are the five needs_input_grad flags of (x, w1, b1, w2, b2); ``h`` is the ``activation``'s output;
    with ``dx_activation`` x is that activation's output and dx its pre-activation gradient (deeper MLPs)."""
    need_x, need_w1, need_b1, need_w2, need_b2 = needs[:5]
    dz, dh = ops.mlp_backward_rows(h, w2, need_dh=need_x or need_w1 or need_b1, activation=activation, **grad)
    return ops.mlp_backward_grads(x, w1, h, dz, dh, need_dx=need_x, need_w1=need_w1 or need_b1,
                                  need_w2=need_w2 or need_b2, has_b1=has_b1, has_b2=has_b2,
                                  dx_activation=dx_activation)


def nll_forward(ops, x, w1, b1, w2, b2, target, ignore_index, reduction, store_h, activation):
    """(loss, logit gradient, h, count), after the CPU target range check.

    loss is reduced as asked, in float32 (float64 for float64 x); count is the number of counted rows for
    "mean" (a 0-dim tensor, read by :func:`row_scale`), else None. Over zero counted rows the mean is 0/0 = NaN.
    """
    checks.check_target_range(target, w2.shape[0], ignore_index)
    _, h, nll, dlogits = ops.mlp_forward(x, w1, b1, w2, b2, target=target, ignore_index=ignore_index,
                                         store_h=store_h, store_y=False, activation=activation)
    if reduction == "none":
        return nll, dlogits, h, None
    if reduction == "sum":
        return nll.sum(), dlogits, h, None
    count = (target != ignore_index).sum()
    return nll.sum() / count, dlogits, h, count


def row_scale(dloss, count):
    """The factor of every row's logit gradient: dloss (rows,) for "none", dloss for "sum", dloss / count for
    "mean" — with count at least 1, so that, as in torch, no counted rows give zero gradients, not NaN."""
    dloss = dloss.to(torch.promote_types(dloss.dtype, torch.float32))
    return dloss if count is None else dloss / count.clamp(min=1)


class _MLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, activation):
        ops = backend.mlp_ops(x.device, x.dtype)
        grads = any(ctx.needs_input_grad)
        y, h, _, _ = ops.mlp_forward(x, w1, b1, w2, b2, store_h=grads, activation=activation)
        if grads:
            ctx.ops, ctx.has_b1, ctx.has_b2, ctx.activation = ops, b1 is not None, b2 is not None, activation
            ctx.save_for_backward(x, w1, w2, h, y)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, h, y = ctx.saved_tensors
        grads = mlp_backward(ctx.ops, x, w1, w2, h, ctx.needs_input_grad, ctx.has_b1, ctx.has_b2, ctx.activation,
                             dy=dy, y=y)
        return (*grads, None)


class _MLPNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, target, ignore_index, reduction, activation):
        ops = backend.mlp_ops(x.device, x.dtype)
        grads = any(ctx.needs_input_grad[:5])
        loss, dlogits, h, count = nll_forward(ops, x, w1, b1, w2, b2, target, ignore_index, reduction, grads,
                                              activation)
        if grads:
            ctx.ops, ctx.has_b1, ctx.has_b2, ctx.count = ops, b1 is not None, b2 is not None, count
            ctx.activation = activation
            ctx.save_for_backward(x, w1, w2, h, dlogits)
        return loss.to(x.dtype)

    @staticmethod
    def backward(ctx, dloss):
        x, w1, w2, h, dlogits = ctx.saved_tensors
        grads = mlp_backward(ctx.ops, x, w1, w2, h, ctx.needs_input_grad, ctx.has_b1, ctx.has_b2, ctx.activation,
                             dlogits=dlogits, scale=row_scale(dloss, ctx.count))
        return (*grads, None, None, None, None)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def fused_mlp(x, w1, b1, w2, b2, activation="relu"):
    """``log_softmax(act(x @ w1ᵀ + b1) @ w2ᵀ + b2, dim=-1)`` for ``x`` of shape (*, in), fused; ``act`` is
    ``activation``: "relu" or "sigmoid".

    Weights in nn.Linear layout: ``w1`` (hidden, in), ``w2`` (out, hidden); ``b1``/``b2`` may be None.
    Returns (*, out) log-probabilities in x's dtype; differentiable in x, w1, b1, w2, b2.
    """
    checks.check_mlp(x, w1, b1, w2, b2)
    checks.check_activation(activation)
    if torch.compiler.is_compiling():
        y = torch.ops.pyfused.mlp(_flat(x), w1, b1, w2, b2, activation)[0]
    elif torch.is_grad_enabled():
        y = _MLP.apply(_flat(x), w1, b1, w2, b2, activation)
    else:  # inference (a Function's needs_input_grad ignores no_grad): the y-only kernel variant, nothing saved
        y = backend.mlp_ops(x.device, x.dtype).mlp_forward(_flat(x), w1, b1, w2, b2, store_h=False,
                                                           activation=activation)[0]
    return y.view(*x.shape[:-1], w2.shape[0])


def fused_mlp_nll(x, w1, b1, w2, b2, target, reduction="mean", ignore_index=-100, activation="relu"):
    """``F.nll_loss(fused_mlp(x, ...).reshape(-1, out), target.reshape(-1), reduction, ignore_index)``, fused.

    The logit gradient is made in the forward pass. ``reduction="none"`` returns target's shape, with 0 for
    ignored rows; ``"mean"`` divides by the number of non-ignored rows (NaN when there are none, as in torch).
    A CPU target out of range raises IndexError; on CUDA its row's loss is NaN (the host never reads targets).
    """
    checks.check_mlp(x, w1, b1, w2, b2)
    checks.check_target(x, target, w2.shape[0], reduction, ignore_index)
    checks.check_activation(activation)
    flat_target = target.reshape(-1)
    if torch.compiler.is_compiling():
        loss = torch.ops.pyfused.mlp_nll(_flat(x), w1, b1, w2, b2, flat_target, ignore_index, reduction,
                                         activation)[0]
    elif torch.is_grad_enabled():
        loss = _MLPNLL.apply(_flat(x), w1, b1, w2, b2, flat_target, ignore_index, reduction, activation)
    else:
        loss = nll_forward(backend.mlp_ops(x.device, x.dtype), _flat(x), w1, b1, w2, b2, flat_target, ignore_index,
                           reduction, False, activation)[0].to(x.dtype)
    return loss.view(target.shape) if reduction == "none" else loss


def deep_forward(ops, x, target, ignore_index, reduction, activations, ws, bs, store):
    """A deep MLP's forward: ``linear_act`` for layers 1..L−2, then the fused two-layer head (log_softmax, or
    the NLL with ``target``). Returns ``(out, h, g, xs, count)``: log-probabilities or the reduced loss (x's
    dtype); the head's hidden activations (``store``); y or the logit gradient; the layers' inputs
    ``[x, h_1, ..., h_{L−2}]``; the counted rows for "mean" (else None)."""
    xs = [x]
    for w, b, act in zip(ws[:-2], bs[:-2], activations[:-1]):
        xs.append(ops.linear_act(xs[-1], w, b, act))
    head = (xs[-1], ws[-2], bs[-2], ws[-1], bs[-1])
    if target is None:
        out, h, _, _ = ops.mlp_forward(*head, store_h=store, activation=activations[-1])
        return out, h, out, xs, None
    out, g, h, count = nll_forward(ops, *head, target, ignore_index, reduction, store, activations[-1])
    return out.to(x.dtype), h, g, xs, count


def deep_backward(ops, dout, h, g, xs, ws, count, loss, activations, has_bias, need_x, need):
    """``(dx, dw1, db1, ..., dwL, dbL)`` of :func:`deep_forward` (None where not made): the head's two launches,
    whose dx already carries the derivative of the activation before it, then one grouped gradient launch per
    earlier layer (its dx likewise). ``need`` holds the flags of (w1, b1, ..., wL, bL)."""
    grad = dict(dlogits=g, scale=row_scale(dout, count)) if loss else dict(dy=dout, y=g)
    dx, *grads = mlp_backward(ops, xs[-1], ws[-2], ws[-1], h, (need_x or any(need[:-4]), *need[-4:]),
                              has_bias[-2], has_bias[-1], activations[-1], dx_activation=activations[-2], **grad)
    for i in reversed(range(len(ws) - 2)):  # dx is the gradient of layer i's pre-activation
        if dx is None:  # nothing before this layer needs a gradient
            grads = [None, None, *grads]
            continue
        dx, dw, db, _, _ = ops.mlp_backward_grads(
            xs[i], ws[i], dx, dx, dx, need_dx=need_x or any(need[:2 * i]), need_w1=need[2 * i] or need[2 * i + 1],
            need_w2=False, has_b1=has_bias[i], has_b2=False, dx_activation=activations[i - 1] if i > 0 else None)
        grads = [dw, db, *grads]
    return (dx, *grads)


class _DeepMLP(torch.autograd.Function):
    """:func:`deep_forward` / :func:`deep_backward` for eager calls; params are (w1, b1, ..., wL, bL)."""

    @staticmethod
    def forward(ctx, x, target, ignore_index, reduction, activations, *params):
        ops = backend.mlp_ops(x.device, x.dtype)
        ws, bs = params[0::2], params[1::2]
        grads = any(ctx.needs_input_grad)
        out, h, g, xs, count = deep_forward(ops, x, target, ignore_index, reduction, activations, ws, bs, grads)
        if grads:
            ctx.ops, ctx.activations, ctx.count, ctx.loss = ops, activations, count, target is not None
            ctx.has_bias = [b is not None for b in bs]
            ctx.save_for_backward(h, g, *xs, *ws)
        return out

    @staticmethod
    def backward(ctx, dout):
        h, g, *rest = ctx.saved_tensors
        n_layers = len(ctx.has_bias)
        xs, ws = rest[:n_layers - 1], rest[n_layers - 1:]
        grads = deep_backward(ctx.ops, dout, h, g, xs, ws, ctx.count, ctx.loss, ctx.activations, ctx.has_bias,
                              ctx.needs_input_grad[0], ctx.needs_input_grad[5:])
        return (grads[0], None, None, None, None, *grads[1:])


def fused_deep_mlp(x, weights, biases, activations, target=None, reduction="mean", ignore_index=-100):
    """``log_softmax`` of an MLP of L = len(weights) ≥ 2 nn.Linear layers, with ``activations[i]`` after layer
    i + 1 (L − 1 of them, each "relu" or "sigmoid"); with ``target`` the fused NLL loss instead, as
    :func:`fused_mlp_nll`. ``biases[i]`` may be None. Two layers are :func:`fused_mlp` / :func:`fused_mlp_nll`;
    deeper ones run their first L − 2 layers through ``linear_act`` and end with the same fused head.
    Differentiable in x and every weight and bias; under torch.compile the opaque op ``pyfused::deep_mlp``.
    """
    weights, biases, activations = tuple(weights), tuple(biases), tuple(activations)
    if len(weights) < 2 or len(biases) != len(weights) or len(activations) != len(weights) - 1:
        raise ValueError(f"need L >= 2 weights, L biases (None allowed) and L - 1 activations, got "
                         f"{len(weights)}, {len(biases)} and {len(activations)}")
    checks.check_layers(x, weights, biases)
    for activation in activations:
        checks.check_activation(activation)
    if len(weights) == 2:
        args = (x, weights[0], biases[0], weights[1], biases[1])
        if target is None:
            return fused_mlp(*args, activation=activations[0])
        return fused_mlp_nll(*args, target, reduction=reduction, ignore_index=ignore_index, activation=activations[0])
    out_features = weights[-1].shape[0]
    if target is not None:
        checks.check_target(x, target, out_features, reduction, ignore_index)
        target_shape, target = target.shape, target.reshape(-1)
    if torch.compiler.is_compiling():
        out = torch.ops.pyfused.deep_mlp(_flat(x), target, ignore_index, reduction, ",".join(activations), weights,
                                         [x.new_empty(0) if b is None else b for b in biases])[0]
    elif torch.is_grad_enabled():
        params = [t for pair in zip(weights, biases) for t in pair]
        out = _DeepMLP.apply(_flat(x), target, ignore_index, reduction, activations, *params)
    else:  # inference: nothing kept for a backward
        out = deep_forward(backend.mlp_ops(x.device, x.dtype), _flat(x), target, ignore_index, reduction, activations,
                           weights, biases, False)[0]
    if target is None:
        return out.view(*x.shape[:-1], out_features)
    return out.view(target_shape) if reduction == "none" else out
