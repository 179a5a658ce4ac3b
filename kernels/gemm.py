"""The tile GEMM that every pyfused backward kernel is built from.

``gemm_tile`` computes one ``BLOCK_M × BLOCK_N`` tile of ``C = A @ B`` (fp32 accumulator, operands in their
storage dtype) for matrices given by pointer and strides, so a transposed operand is only a swap of strides.
Optionally it also writes the row sums of ``A`` (``rowsum[m] = Σ_k A[m, k]``): with ``A = dZᵀ`` these are
the bias gradients, taken from the tile that is already on chip. Grouped kernels call it once per tile of
several independent products in a single launch (see :mod:`pyfused.kernels.mlp_backward`).
"""
import triton
import triton.language as tl


@triton.jit
def gemm_tile(
    a_ptr, stride_a_m, stride_a_k,  # A: (M, K)
    b_ptr, stride_b_k, stride_b_n,  # B: (K, N)
    c_ptr, stride_c_m, stride_c_n,  # C: (M, N), written in c_ptr's dtype
    rowsum_ptr,  # (M,) row sums of A, written by the tiles of the first column when ROWSUM
    M, N, K,
    tile,  # index of this tile in row-major tile order, 0 <= tile < cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    ROWSUM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of C = A @ B, reduced over K in a fixed order (deterministic). Reads
    BLOCK_M·K + K·BLOCK_N elements and writes BLOCK_M·BLOCK_N (+ BLOCK_M for the row sums)."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = (tile // tiles_n).to(tl.int64)
    pid_n = (tile % tiles_n).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        k_mask = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_a_m + rk[None, :] * stride_a_k,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_b_k + rn[None, :] * stride_b_n,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if ROWSUM:
            row_sum += tl.sum(a.to(tl.float32), axis=1)
    tl.store(c_ptr + rm[:, None] * stride_c_m + rn[None, :] * stride_c_n,
             acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
    if ROWSUM:
        tl.store(rowsum_ptr + rm, row_sum.to(rowsum_ptr.dtype.element_ty), mask=m_mask & (pid_n == 0))
