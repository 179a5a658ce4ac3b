"""Fused MLP backward in two launches: row-local gradients, then every weight/input gradient at once.

Launch 1, :func:`mlp_backward_rows_kernel` (``BLOCK_M`` rows per program): the logit gradient
``dz`` — from the loss, ``dz = scale_i · (softmax − onehot)`` with the logit gradient the forward already
made; from log-probabilities, ``dz = dy − exp(y) · Σ_j dy_j`` — and the hidden gradient
``dh = act'(dz @ w2)`` (``⊙ [h > 0]`` for relu, ``⊙ (1 − h) ⊙ h`` for sigmoid). Reads B·out (+B·out) + B·hidden + out·hidden, writes B·out + B·hidden.

Launch 2, :func:`mlp_backward_grads_kernel`: one grouped launch over the tiles of three products,
``dx = dh @ w1`` (B × in, K = hidden), ``dw1 = dhᵀ @ x`` (hidden × in, K = B) with ``db1 = Σ_rows dh``, and
``dw2 = dzᵀ @ h`` (out × hidden, K = B) with ``db2 = Σ_rows dz``; products not asked for get no tiles.
Each output tile is reduced over K by one program in a fixed order, with no atomics: results are
bit-identical from run to run. Reads dh, x, w1, dz, h about once per tile row/column (L2), writes the
gradients once. Extra memory of the backward: B·(out + hidden) for dz and dh.

For a deeper MLP the same two steps repeat per layer (row-local activation gradient, grouped GEMMs).
"""
import torch
import triton
import triton.language as tl

from .activation import activation_grad
from .gemm import gemm_tile, tile_product
from .launch import acc_dtype, dot_block, dot_precision, hidden_block, launch
from .mlp_forward import MAX_OUT


@triton.jit
def mlp_backward_rows_kernel(
    g_ptr,  # LOSS: (B, out) logit gradient of the forward; else: (B, out) dy, the gradient of y
    y_ptr,  # (B, out) log-probabilities (not LOSS), contiguous
    scale_ptr,  # (B,) or broadcast (stride 0) per-row factor of the loss gradient (LOSS)
    h_ptr, w2_ptr,  # h (B, hidden) contiguous; w2 (out, hidden)
    dz_ptr, dh_ptr,  # out: (B, out), (B, hidden), contiguous
    n_rows, n_hidden, n_out,
    stride_g_row, stride_g_col, stride_scale, stride_w2_row, stride_w2_col,
    LOSS: tl.constexpr, NEED_DH: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr, PRECISION: tl.constexpr,
):
    """dz and dh = act'(dz @ w2) (:func:`~pyfused.kernels.activation.activation_grad`) for BLOCK_M rows."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_OUT)
    col_mask = cols < n_out
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(g_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col, mask=mask, other=0.0)
    g = g.to(ACC)
    if LOSS:
        dz = g * tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0.0).to(ACC)[:, None]
    else:
        y = tl.load(y_ptr + rows[:, None] * n_out + cols[None, :], mask=mask, other=float("-inf"))
        dz = g - tl.exp(y.to(ACC)) * tl.sum(g, axis=1)[:, None]
    dz = dz.to(dz_ptr.dtype.element_ty)
    tl.store(dz_ptr + rows[:, None] * n_out + cols[None, :], dz, mask=mask)
    if NEED_DH:
        for h0 in range(0, n_hidden, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_mask = hs < n_hidden
            w2 = tl.load(w2_ptr + cols[:, None] * stride_w2_row + hs[None, :] * stride_w2_col,
                         mask=col_mask[:, None] & h_mask[None, :], other=0.0)
            dh = tl.dot(dz, w2, input_precision=PRECISION, out_dtype=ACC)
            hmask2 = row_mask[:, None] & h_mask[None, :]
            h = tl.load(h_ptr + rows[:, None] * n_hidden + hs[None, :], mask=hmask2, other=0.0)
            dh = activation_grad(dh, h, ACTIVATION)
            tl.store(dh_ptr + rows[:, None] * n_hidden + hs[None, :], dh.to(dh_ptr.dtype.element_ty), mask=hmask2)


@triton.jit
def mlp_backward_grads_kernel(
    x_ptr, w1_ptr, h_ptr, dz_ptr, dh_ptr,  # x (B, in); w1 (hidden, in); h, dh (B, hidden); dz (B, out)
    dx_ptr, dw1_ptr, db1_ptr, dw2_ptr, db2_ptr,  # out: dx (B, in), dw1 (hidden, in), db1, dw2 (out, hidden), db2
    n_rows, n_in, n_hidden, n_out,
    stride_x_row, stride_x_col, stride_w1_row, stride_w1_col,
    tiles_dx, tiles_dw1,  # program ids [0, tiles_dx) make dx, the next tiles_dw1 dw1, the rest dw2
    HAS_DB1: tl.constexpr, HAS_DB2: tl.constexpr,
    DX_ACTIVATION: tl.constexpr,  # "none", or the activation whose output x is: dx becomes act'(dh @ w1)
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One tile of dx = dh @ w1 (times the derivative of the activation that made x, in a deeper MLP),
    dw1 = dhᵀ @ x (+ db1) or dw2 = dzᵀ @ h (+ db2), by program id."""
    pid = tl.program_id(0)
    if pid < tiles_dx:
        if DX_ACTIVATION == "none":
            gemm_tile(dh_ptr, n_hidden, 1, w1_ptr, stride_w1_row, stride_w1_col, dx_ptr, n_in, 1, dx_ptr,
                      n_rows, n_in, n_hidden, pid, False, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        else:
            acc, _, rm, rn, _ = tile_product(dh_ptr, n_hidden, 1, w1_ptr, stride_w1_row, stride_w1_col,
                                             n_rows, n_in, n_hidden, pid, False, ACC,
                                             BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            mask = (rm < n_rows)[:, None] & (rn < n_in)[None, :]
            x = tl.load(x_ptr + rm[:, None] * stride_x_row + rn[None, :] * stride_x_col, mask=mask, other=0.0)
            dx = activation_grad(acc, x, DX_ACTIVATION)
            tl.store(dx_ptr + rm[:, None] * n_in + rn[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    elif pid < tiles_dx + tiles_dw1:
        gemm_tile(dh_ptr, 1, n_hidden, x_ptr, stride_x_row, stride_x_col, dw1_ptr, n_in, 1, db1_ptr,
                  n_hidden, n_in, n_rows, pid - tiles_dx, HAS_DB1, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    else:
        gemm_tile(dz_ptr, 1, n_out, h_ptr, n_hidden, 1, dw2_ptr, n_hidden, 1, db2_ptr,
                  n_out, n_hidden, n_rows, pid - tiles_dx - tiles_dw1, HAS_DB2, ACC, BLOCK_M, BLOCK_N, BLOCK_K,
                  PRECISION)


def rows_config(n_rows: int, n_hidden: int, n_out: int, dtype: torch.dtype) -> dict:
    """Launch configuration of :func:`mlp_backward_rows_kernel` (w2 tiles bounded by :func:`hidden_block`)."""
    block_out = dot_block(n_out, MAX_OUT)
    return dict(BLOCK_M=16, BLOCK_H=hidden_block(n_hidden, block_out), BLOCK_OUT=block_out,
                num_warps=4 if block_out <= 256 else 8, num_stages=2)


def grads_config(n_rows: int, n_in: int, n_hidden: int, n_out: int, dtype: torch.dtype) -> dict:
    """Launch configuration of :func:`mlp_backward_grads_kernel` (shared by its three products)."""
    return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2)


def mlp_backward_rows(h, w2, *, dy=None, y=None, dlogits=None, scale=None, need_dh=True, activation="relu"):
    """Launch 1. Either ``dy`` and ``y`` (backward of log_softmax) or ``dlogits`` and ``scale`` (loss;
    ``scale`` is (B,) or a 0-dim tensor); ``h`` is the output of the hidden ``activation``. Returns
    ``(dz, dh)``; dh is None unless ``need_dh``."""
    loss = dlogits is not None
    g = dlogits if loss else dy
    n_rows, n_out = g.shape
    n_hidden = w2.shape[1]
    dz = torch.empty((n_rows, n_out), device=g.device, dtype=h.dtype)
    dh = torch.empty((n_rows, n_hidden), device=g.device, dtype=h.dtype) if need_dh else None
    if n_rows == 0:
        return dz, dh
    cfg = rows_config(n_rows, n_hidden, n_out, h.dtype)
    launch(mlp_backward_rows_kernel, (triton.cdiv(n_rows, cfg["BLOCK_M"]),), g.device,
        g, y, scale, h, w2, dz, dh,
        n_rows, n_hidden, n_out,
        g.stride(0), g.stride(1), (scale.stride(0) if scale.dim() else 0) if loss else 0,
        w2.stride(0), w2.stride(1),
        LOSS=loss, NEED_DH=need_dh, ACTIVATION=activation, ACC=acc_dtype(h.dtype), PRECISION=dot_precision(h.dtype, h.device), **cfg,
    )
    return dz, dh


def mlp_backward_grads(x, w1, h, dz, dh, *, need_dx=True, need_w1=True, need_w2=True, has_b1=True, has_b2=True,
                       dx_activation=None):
    """Launch 2. Returns ``(dx, dw1, db1, dw2, db2)``, None for what is not asked for. ``need_w1`` makes
    dw1 (and db1 if ``has_b1``), ``need_w2`` makes dw2 (and db2 if ``has_b2``). ``dx_activation``: x is the
    output of that activation (a deeper MLP's previous layer), and dx comes back multiplied by its derivative.
    Without ``need_w2``, ``h`` and ``dz`` are not read (one layer's backward: pass ``dh`` for them)."""
    n_rows, n_in = x.shape
    n_hidden, n_out = h.shape[1], dz.shape[1]
    new = lambda *shape: torch.empty(shape, device=x.device, dtype=x.dtype)  # noqa: E731
    dx = new(n_rows, n_in) if need_dx else None
    dw1 = new(n_hidden, n_in) if need_w1 else None
    db1 = new(n_hidden) if need_w1 and has_b1 else None
    dw2 = new(n_out, n_hidden) if need_w2 else None
    db2 = new(n_out) if need_w2 and has_b2 else None
    cfg = grads_config(n_rows, n_in, n_hidden, n_out, x.dtype)
    tiles = lambda m, n: triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])  # noqa: E731
    tiles_dx = tiles(n_rows, n_in) if need_dx else 0
    tiles_dw1 = tiles(n_hidden, n_in) if need_w1 else 0
    tiles_dw2 = tiles(n_out, n_hidden) if need_w2 else 0
    if tiles_dx + tiles_dw1 + tiles_dw2 == 0:
        return dx, dw1, db1, dw2, db2
    fill = lambda t: dz if t is None else t  # noqa: E731  (stands in for an output with no tiles)
    launch(mlp_backward_grads_kernel, (tiles_dx + tiles_dw1 + tiles_dw2,), x.device,
        x, w1, h, dz, fill(dh), fill(dx), fill(dw1), db1, fill(dw2), db2,
        n_rows, n_in, n_hidden, n_out,
        x.stride(0), x.stride(1), w1.stride(0), w1.stride(1),
        tiles_dx, tiles_dw1,
        HAS_DB1=db1 is not None, HAS_DB2=db2 is not None, DX_ACTIVATION=dx_activation or "none",
        ACC=acc_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype, x.device), **cfg,
    )
    return dx, dw1, db1, dw2, db2
