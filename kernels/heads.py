"""The head of the network and its loss, as epilogues on the logits tile ``z`` (``BLOCK_M × BLOCK_OUT``, in the
accumulator type, never leaving the chip): each loss gives its per-row (or per-element) value and the gradient of
the logits, made in the forward pass so that a backward starts from it.

- :func:`log_softmax_rows`: ``y = log_softmax(z)`` and ``p = softmax(z)`` over the valid columns.
- :func:`class_loss`: the negative log-likelihood of the target class — ``F.nll_loss`` of a log_softmax head
  and ``F.cross_entropy`` of a logits head are the same math — with the logit gradient ``p − onehot(t)``; ignored
  rows count 0 with zero gradient, targets out of range give NaN (their row's loss and gradient).
- :func:`squared_error`: ``F.mse_loss``'s ``(z − t)²`` per element and the logit gradient ``2·(z − t)``.

The gradients are unscaled: the reduction's factor (``1 / count``, ``1 / numel``, the incoming gradient) is
applied where the scale is known — the next launch, or the backward.
"""
import triton
import triton.language as tl


@triton.jit
def log_softmax_rows(z, col_mask):
    """``(y, p)``: log_softmax and softmax of each row of ``z`` over ``col_mask`` (−inf / 0 elsewhere); a NaN in a
    row makes the whole row NaN, as in PyTorch."""
    z = tl.where(col_mask[None, :], z, float("-inf"))
    shifted = z - tl.max(z, axis=1)[:, None]
    e = tl.exp(shifted)
    denom = tl.sum(e, axis=1)
    return shifted - tl.log(denom)[:, None], e / denom[:, None]


@triton.jit
def load_class_target(target_ptr, stride_target, rows, row_mask, ignore_index):
    """``(t, keep)``: int64 class indices of ``rows`` and whether each row counts. Padding rows load 0 and do not
    count: ``other=ignore_index`` would wrap in a small target dtype (uint8: −100 becomes 156)."""
    t = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    return t, row_mask & (t != ignore_index)


@triton.jit
def class_loss(y, p, t, keep, cols, n_out):
    """``(nll, dz)``: ``−y[i, t_i]`` per row and ``p − onehot(t)`` (see the module docstring)."""
    onehot = cols[None, :] == t[:, None]
    in_range = (t >= 0) & (t < n_out)
    picked = tl.sum(tl.where(onehot, y, 0.0), axis=1)
    nll = tl.where(keep, tl.where(in_range, -picked, float("nan")), 0.0)
    dz = tl.where(keep[:, None], tl.where(in_range[:, None], p - onehot.to(p.dtype), float("nan")), 0.0)
    return nll, dz


@triton.jit
def squared_error(z, t, mask):
    """``(e², 2·e)`` with ``e = z − t`` inside ``mask`` (0 outside)."""
    e = tl.where(mask, z - t, 0.0)
    return e * e, 2.0 * e
