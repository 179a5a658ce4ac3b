"""Fused MLP forward: linear → activation → linear → log_softmax (→ NLL and its logit gradient), one launch.

Each program owns ``BLOCK_M`` rows of ``x`` and walks the hidden layer in ``BLOCK_H`` slices. A slice of
``h = act(x @ w1ᵀ + b1)`` (relu or sigmoid, :mod:`pyfused.kernels.activation`) is accumulated over ``in`` in ``BLOCK_K`` steps, rounded to the input dtype (as
PyTorch does between layers), optionally stored for backward, and at once multiplied into the logit
accumulator ``z += h_slice @ w2[:, slice]ᵀ``; the logits never leave the chip. The row-wise log_softmax
is the epilogue. For the loss, the epilogue also writes ``nll_i = −y[i, t_i]`` and the logit gradient
``softmax(z_i) − onehot(t_i)`` (zero for ignored rows), so backward starts from it: the loss's backward
is only the weight and input gradients.

A layer is one loop of the same shape (accumulate over the previous width, bias, activation, feed the next
accumulator); a deeper MLP (``DeepFusedMLP``) runs its earlier layers through
:mod:`pyfused.kernels.linear_act` and ends with this kernel as its head.

Memory (B rows, dtype size s): reads B·in·s once per hidden slice (hidden/BLOCK_H passes, the later ones from
L2), the weights once per program; writes B·hidden·s for h (if saved) and B·out·s for y (or 4B + B·out·s for
nll and the logit gradient). Registers: a BLOCK_M × BLOCK_OUT fp32 accumulator, so ``out`` ≤ 1024.
"""
import torch
import triton
import triton.language as tl

from .activation import activate
from .launch import acc_dtype, dot_block, dot_precision, hidden_block, launch

MAX_OUT = 1024


@triton.jit
def mlp_forward_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # x (B, in); w1 (hidden, in); b1 (hidden,); w2 (out, hidden); b2 (out,)
    h_ptr,  # out: (B, hidden) contiguous, activations saved for backward (STORE_H)
    y_ptr,  # out: (B, out) contiguous, log-probabilities (STORE_Y)
    target_ptr,  # (B,) integer class indices (LOSS)
    nll_ptr,  # out: (B,) float32 (float64 for float64 x), −y[i, t_i]; 0 for ignored rows, NaN for targets out of range (LOSS)
    dz_ptr,  # out: (B, out) contiguous, softmax − onehot(t), zero rows where t == ignore_index (LOSS)
    n_rows, n_in, n_hidden, n_out, ignore_index,
    stride_x_row, stride_x_col, stride_w1_row, stride_w1_col, stride_w2_row, stride_w2_col, stride_target,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, ACTIVATION: tl.constexpr,
    STORE_H: tl.constexpr, STORE_Y: tl.constexpr, LOSS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """y = log_softmax(act(x @ w1ᵀ + b1) @ w2ᵀ + b2) for BLOCK_M rows; with LOSS also nll and dz."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_OUT)
    col_mask = cols < n_out
    z = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=ACC)
    for h0 in range(0, n_hidden, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < n_hidden
        acc = tl.zeros((BLOCK_M, BLOCK_H), dtype=ACC)
        for k0 in range(0, n_in, BLOCK_K):
            ks = tl.arange(0, BLOCK_K).to(tl.int64) + k0
            k_mask = ks < n_in
            x = tl.load(x_ptr + rows[:, None] * stride_x_row + ks[None, :] * stride_x_col,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w1t = tl.load(w1_ptr + hs[None, :] * stride_w1_row + ks[:, None] * stride_w1_col,
                          mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            acc = tl.dot(x, w1t, acc, input_precision=PRECISION, out_dtype=ACC)
        if HAS_B1:
            acc += tl.load(b1_ptr + hs, mask=h_mask, other=0.0).to(ACC)[None, :]
        h = activate(acc, ACTIVATION).to(x_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + rows[:, None] * n_hidden + hs[None, :], h, mask=row_mask[:, None] & h_mask[None, :])
        w2t = tl.load(w2_ptr + cols[None, :] * stride_w2_row + hs[:, None] * stride_w2_col,
                      mask=h_mask[:, None] & col_mask[None, :], other=0.0)
        z = tl.dot(h, w2t, z, input_precision=PRECISION, out_dtype=ACC)
    if HAS_B2:
        z += tl.load(b2_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    z = tl.where(col_mask[None, :], z, float("-inf"))
    shifted = z - tl.max(z, axis=1)[:, None]
    e = tl.exp(shifted)
    denom = tl.sum(e, axis=1)
    y = shifted - tl.log(denom)[:, None]
    out_mask = row_mask[:, None] & col_mask[None, :]
    out_offsets = rows[:, None] * n_out + cols[None, :]
    if STORE_Y:
        tl.store(y_ptr + out_offsets, y.to(y_ptr.dtype.element_ty), mask=out_mask)
    if LOSS:
        # padding rows are not counted: other=ignore_index would wrap in a small target dtype (uint8: 156)
        t = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
        keep = row_mask & (t != ignore_index)
        onehot = cols[None, :] == t[:, None]
        picked = tl.sum(tl.where(onehot, y, 0.0), axis=1)
        in_range = (t >= 0) & (t < n_out)
        nll = tl.where(keep, tl.where(in_range, -picked, float("nan")), 0.0)
        tl.store(nll_ptr + rows, nll, mask=row_mask)
        dz = tl.where(keep[:, None], e / denom[:, None] - onehot.to(ACC), 0.0)
        tl.store(dz_ptr + out_offsets, dz.to(dz_ptr.dtype.element_ty), mask=out_mask)


def forward_config(n_rows: int, n_in: int, n_hidden: int, n_out: int, dtype: torch.dtype) -> dict:
    """Launch configuration of :func:`mlp_forward_kernel` for these sizes (block sizes, warps, stages).

    Chosen from ``python -m bench.compile_report`` (sm_80, sm_90): no spills at the seed shape, shared memory
    within bounds over the sweep. BLOCK_M = 32 (half the weight re-reads) only for 16-bit dtypes past 4096
    rows: fp32 at 32 rows needs 190 to 255 registers and spills. Three stages prefetch two K steps.
    """
    block_out = dot_block(n_out, MAX_OUT)
    block_m = 32 if n_rows > 4096 and block_out <= 128 and dtype.itemsize == 2 else 16
    return dict(
        BLOCK_M=block_m,
        BLOCK_K=dot_block(n_in, 32),
        BLOCK_H=hidden_block(n_hidden, block_out),
        BLOCK_OUT=block_out,
        num_warps=4 if block_out <= 256 else 8,
        num_stages=3,
    )


def mlp_forward(x, w1, b1, w2, b2, *, target=None, ignore_index=-100, store_h=True, store_y=True,
                activation="relu"):
    """Launch the fused forward on validated 2-D ``x`` (B, in).

    Returns ``(y, h, nll, dz)``: y (B, out) log-probabilities or None (``store_y``), h (B, hidden) or None
    (``store_h``), and with a ``target`` (B,) the per-row float32 nll and the logit gradient dz (B, out),
    else None for both.
    """
    n_rows, n_in = x.shape
    n_hidden, n_out = w1.shape[0], w2.shape[0]
    if n_out > MAX_OUT:
        raise ValueError(f"the Triton kernels take out_features <= {MAX_OUT}, got {n_out}; use PYFUSED_BACKEND=torch")
    loss = target is not None
    y = torch.empty((n_rows, n_out), device=x.device, dtype=x.dtype) if store_y else None
    h = torch.empty((n_rows, n_hidden), device=x.device, dtype=x.dtype) if store_h else None
    nll = torch.empty(n_rows, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32)) if loss else None
    dz = torch.empty((n_rows, n_out), device=x.device, dtype=x.dtype) if loss else None
    if n_rows == 0:
        return y, h, nll, dz
    cfg = forward_config(n_rows, n_in, n_hidden, n_out, x.dtype)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]),)
    launch(mlp_forward_kernel, grid, x.device,
        x, w1, b1 if b1 is not None else w1, w2, b2 if b2 is not None else w2,  # unused pointers when no bias
        h, y, target, nll, dz,
        n_rows, n_in, n_hidden, n_out, ignore_index,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1),
        target.stride(0) if loss else 0,
        HAS_B1=b1 is not None, HAS_B2=b2 is not None, ACTIVATION=activation,
        STORE_H=store_h, STORE_Y=store_y, LOSS=loss, ACC=acc_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype, x.device),
        **cfg,
    )
    return y, h, nll, dz
