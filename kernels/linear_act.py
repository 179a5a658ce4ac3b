"""One hidden layer of a deeper MLP: ``h = act(x @ wᵀ + b)`` as a tile GEMM with a bias + activation epilogue.

A ``DeepFusedMLP`` runs its layers before the last hidden one through this kernel and ends with the fused head
(:mod:`pyfused.kernels.mlp_forward`: linear → act → linear → log_softmax → NLL). Its backward needs no kernel of
its own: the grouped gradient launch of :mod:`pyfused.kernels.mlp_backward` makes ``dW = dpreᵀ x``,
``db = Σ_rows dpre`` and ``dx``, the latter already multiplied by the previous layer's activation derivative
(its ``DX_ACTIVATION`` epilogue), so each layer of the backward is one launch.

Sizes: B rows, K = in, N = out features. Each program makes one BLOCK_M × BLOCK_N tile of h, reading
BLOCK_M·K of x and K·BLOCK_N of w (x and w from L2 after the first tiles) and writing its tile once.
"""
import torch
import triton
import triton.language as tl

from .activation import activate
from .gemm import tile_product
from .launch import acc_dtype, dot_block, dot_precision, launch


@triton.jit
def linear_act_kernel(
    x_ptr, w_ptr, b_ptr,  # x (B, K); w (N, K) nn.Linear layout; b (N,) (HAS_BIAS)
    h_ptr,  # out: (B, N) contiguous, x's dtype
    n_rows, n_in, n_out,
    stride_x_row, stride_x_col, stride_w_row, stride_w_col,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """One tile of h = act(x @ wᵀ + b), ``ACC`` accumulator (fp64 for float64), rounded to x's dtype once."""
    acc, _, rm, rn, _ = tile_product(x_ptr, stride_x_row, stride_x_col, w_ptr, stride_w_col, stride_w_row,
                                     n_rows, n_out, n_in, tl.program_id(0), False, ACC,
                                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    n_mask = rn < n_out
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(ACC)[None, :]
    h = activate(acc, ACTIVATION).to(h_ptr.dtype.element_ty)
    tl.store(h_ptr + rm[:, None] * n_out + rn[None, :], h, mask=(rm < n_rows)[:, None] & n_mask[None, :])


def linear_act_config(n_rows: int, n_in: int, n_out: int, dtype: torch.dtype) -> dict:
    """Launch configuration of :func:`linear_act_kernel`: 32 × (up to 64) tiles, K steps of 32, 4 warps."""
    return dict(BLOCK_M=32, BLOCK_N=dot_block(n_out, 64), BLOCK_K=32, num_warps=4, num_stages=2)


def linear_act(x, w, b, activation):
    """``act(x @ wᵀ + b)`` for validated 2-D x (B, in), w (out, in), b (out,) or None: a new (B, out) tensor."""
    n_rows, n_in = x.shape
    n_out = w.shape[0]
    h = torch.empty((n_rows, n_out), device=x.device, dtype=x.dtype)
    if n_rows == 0:
        return h
    cfg = linear_act_config(n_rows, n_in, n_out, x.dtype)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]),)
    launch(linear_act_kernel, grid, x.device,
        x, w, w if b is None else b, h,  # w stands in for an absent bias (never read)
        n_rows, n_in, n_out,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        HAS_BIAS=b is not None, ACTIVATION=activation, ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, x.device), **cfg,
    )
    return h
