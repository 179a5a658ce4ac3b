"""The layer loop of every pyfused kernel: one row block of a linear layer, forward and backward.

A program of :mod:`pyfused.kernels.rows` owns ``BLOCK_M`` rows and walks the network layer by layer with these
two building blocks, each producing one ``BLOCK_M × BLOCK_N`` slice of a layer's output:

- :func:`linear_slice`: ``a[rows] @ W[cols]ᵀ + b[cols]`` (W in nn.Linear layout ``(out, in)``), accumulated over
  ``in`` in ``BLOCK_K`` steps — the caller applies the activation (:mod:`pyfused.kernels.activation`);
- :func:`grad_slice`: ``g[rows] @ W[:, cols]``, the gradient flowing back through W to the slice ``cols`` of the
  layer's input, accumulated over ``out`` in ``BLOCK_K`` steps — the caller multiplies by the activation's
  derivative read off the saved activations.

Operands are given by pointer and strides (a transposed or strided tensor is only a swap of strides); masks
cover every ragged edge; the accumulator type is ``ACC`` (fp32, or fp64 for float64). Each call reads
``BLOCK_M·K`` of the activations and ``K·BLOCK_N`` of the weight (from L2 after the first program).
"""
import triton
import triton.language as tl


@triton.jit
def linear_slice(
    a_ptr, stride_a_row, stride_a_col,  # activations (B, K): x or a hidden layer's output
    w_ptr, stride_w_row, stride_w_col,  # W (N, K), nn.Linear layout
    b_ptr,  # (N,) bias (HAS_BIAS)
    rows, row_mask, cols, col_mask,  # this slice: BLOCK_M row indices (int64) and BLOCK_N output indices
    n_in,  # K
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``a[rows] @ W[cols]ᵀ (+ b[cols])`` in ``ACC``, reduced over K in a fixed order (deterministic)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, n_in, BLOCK_K):
        ks = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        k_mask = ks < n_in
        a = tl.load(a_ptr + rows[:, None] * stride_a_row + ks[None, :] * stride_a_col,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * stride_w_row + ks[:, None] * stride_w_col,
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def grad_slice(
    g_ptr, stride_g_row,  # (B, K) gradient of the layer's output (pre-activation), unit column stride
    w_ptr, stride_w_row, stride_w_col,  # W (K, N): the layer's weight, nn.Linear layout (out = K, in = N)
    rows, row_mask, cols, col_mask,  # BLOCK_M rows and the BLOCK_N input features of this slice
    n_out,  # K: the layer's output features
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """``g[rows] @ W[:, cols]`` in ``ACC``: the gradient of the layer's input slice, before the activation's
    derivative; reduced over K in a fixed order."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, n_out, BLOCK_K):
        ks = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        k_mask = ks < n_out
        g = tl.load(g_ptr + rows[:, None] * stride_g_row + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_w_row + cols[None, :] * stride_w_col,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def layer_input(x_ptr, stride_x_row, stride_x_col, acts, widths, i: tl.constexpr):
    """Pointer and (row, column) strides of layer ``i``'s input: x for the first layer, else the contiguous
    activations ``acts[i − 1]`` of width ``widths[i]``."""
    if i == 0:
        return x_ptr, stride_x_row, stride_x_col
    else:
        return acts[i - 1], widths[i], 1
