"""The tile GEMM that every pyfused backward kernel is built from.

``tile_product`` computes one ``BLOCK_M × BLOCK_N`` tile of ``A @ B`` (operands in their storage dtype, an fp32
or fp64 accumulator) for matrices given by pointer and strides, so a transposed operand is only a swap of
strides. Optionally it also makes the row sums of ``A`` (``Σ_k A[m, k]``): with ``A = dZᵀ`` these are the bias
gradients, taken from the tile that is already on chip. The grouped gradient kernel (:mod:`pyfused.kernels.grads`)
calls it once per tile of several independent products in a single launch, then stores the tile, adds it to
gradient sums, or applies the optimizer to it.
"""
import triton
import triton.language as tl


@triton.jit
def tile_product(
    a_ptr, stride_a_m, stride_a_k,  # A: (M, K)
    b_ptr, stride_b_k, stride_b_n,  # B: (K, N)
    M, N, K,
    tile,  # index of this tile in row-major tile order, 0 <= tile < cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    ROWSUM: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of A @ B in the accumulator type ``ACC``, reduced over K in a fixed order (deterministic), and
    with ROWSUM the tile rows' sums Σ_k A[m, k]. Returns ``(acc, row_sum, rm, rn, pid_n)``: the tile, the row
    sums (zeros without ROWSUM), its row and column indices (int64) and its column of tiles. Reads
    BLOCK_M·K + K·BLOCK_N elements."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = (tile // tiles_n).to(tl.int64)
    pid_n = (tile % tiles_n).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        rk = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        k_mask = rk < K
        a = tl.load(a_ptr + rm[:, None] * stride_a_m + rk[None, :] * stride_a_k,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_b_k + rn[None, :] * stride_b_n,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        if ROWSUM:
            row_sum += tl.sum(a.to(ACC), axis=1)
    return acc, row_sum, rm, rn, pid_n
