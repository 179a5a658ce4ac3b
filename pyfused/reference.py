"""The pure-torch twins of the kernels: the CPU / ``PYFUSED_BACKEND=torch`` path and the tests' fast oracle.

Each function has the signature and the results of its launcher in :mod:`pyfused.kernels` and states the same
math with plain tensor ops, without autograd. They are written for speed on the CPU too: one matmul per
product, activations and softmax made in place, the loss gradient made in the forward, and only the
gradients that are asked for.
"""
import torch


def linear_act(x, w, b, activation):
    """Twin of :func:`pyfused.kernels.linear_act.linear_act`: ``act(x @ wᵀ + b)``."""
    return activate_(torch.addmm(b, x, w.t()) if b is not None else torch.mm(x, w.t()), activation)


def activate_(h, activation):
    """The hidden activation applied to ``h`` in place (eager's own ``relu_`` / ``sigmoid_``); returns h."""
    return h.relu_() if activation == "relu" else h.sigmoid_()


def mlp_forward(x, w1, b1, w2, b2, *, target=None, ignore_index=-100, store_h=True, store_y=True,
                activation="relu"):
    """Twin of :func:`pyfused.kernels.mlp_forward.mlp_forward`: ``(y, h, nll, dz)`` for 2-D x.

    h = act(x @ w1ᵀ + b1) (relu or sigmoid); z = h @ w2ᵀ + b2; y = log_softmax(z); nll_i = −y[i, t_i] (0 when
    t_i is ignored); dz = softmax(z) − onehot(t) with zero rows where t is ignored; nll in float32 (float64 for
    float64). Targets out of range must be rejected before this is called.
    """
    h = linear_act(x, w1, b1, activation)
    z = torch.addmm(b2, h, w2.t()) if b2 is not None else torch.mm(h, w2.t())
    y = torch.log_softmax(z, dim=1)
    nll = dz = None
    if target is not None:
        target = target.long()
        nll = torch.nn.functional.nll_loss(y, target, reduction="none", ignore_index=ignore_index)
        keep = (target != ignore_index).unsqueeze(1).to(y.dtype)
        dz = torch.exp(y, out=z)
        dz.scatter_add_(1, torch.where(keep > 0, target.unsqueeze(1), 0), keep.neg())
        dz.mul_(keep)
        nll = nll.to(torch.promote_types(y.dtype, torch.float32))
    return (y if store_y else None), (h if store_h else None), nll, dz


def mlp_backward_rows(h, w2, *, dy=None, y=None, dlogits=None, scale=None, need_dh=True, activation="relu"):
    """Twin of :func:`pyfused.kernels.mlp_backward.mlp_backward_rows`: ``(dz, dh)``.

    dz = scale_i · dlogits (loss) or dy − exp(y) · Σ_j dy (log_softmax backward); dh = act'(dz @ w2) from the
    activation's output h (:func:`activation_backward`).
    """
    if dlogits is not None:
        dz = (dlogits * (scale.unsqueeze(1) if scale.dim() else scale)).to(h.dtype)
    else:
        dz = dy - torch.exp(y) * dy.sum(dim=1, keepdim=True)
    if not need_dh:
        return dz, None
    return dz, activation_backward(torch.mm(dz, w2), h, activation)


def activation_backward(g, h, activation):
    """The gradient through the hidden activation from its output ``h``, written over ``g`` with ATen's own
    backward ops (eager's rounding): relu ``g ⊙ [h > 0]``, sigmoid ``g ⊙ (1 − h) ⊙ h``."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward.grad_input(g, h, 0, grad_input=g)
    return torch.ops.aten.sigmoid_backward.grad_input(g, h, grad_input=g)


def mlp_backward_grads(x, w1, h, dz, dh, *, need_dx=True, need_w1=True, need_w2=True, has_b1=True, has_b2=True,
                       dx_activation=None):
    """Twin of :func:`pyfused.kernels.mlp_backward.mlp_backward_grads`: ``(dx, dw1, db1, dw2, db2)``.

    dx = dh @ w1 (then ``act'`` of ``dx_activation``, read off x, when given); dw1 = dhᵀ @ x; db1 = Σ_rows dh;
    dw2 = dzᵀ @ h; db2 = Σ_rows dz.
    """
    dx = torch.mm(dh, w1) if need_dx else None
    if dx is not None and dx_activation is not None:
        activation_backward(dx, x, dx_activation)
    dw1 = torch.mm(dh.t(), x) if need_w1 else None
    db1 = dh.sum(0) if need_w1 and has_b1 else None
    dw2 = torch.mm(dz.t(), h) if need_w2 else None
    db2 = dz.sum(0) if need_w2 and has_b2 else None
    return dx, dw1, db1, dw2, db2
