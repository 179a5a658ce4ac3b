"""The tile GEMM that every pyfused backward kernel is built from.

``tile_product`` computes one ``BLOCK_M × BLOCK_N`` tile of ``A @ B`` (operands in their storage dtype, an fp32
or fp64 accumulator) for matrices given by pointer and strides, so a transposed operand is only a swap of
strides. Optionally it also makes the row sums of ``A`` (``Σ_k A[m, k]``): with ``A = dZᵀ`` these are the bias
gradients, taken from the tile that is already on chip. The grouped gradient kernel (:mod:`pyfused.kernels.grads`)
calls it once per tile (or per slice of a tile's reduction) of several independent products in a single launch,
then stores the tile, adds it to gradient sums, or applies the optimizer to it.
"""
import triton
import triton.language as tl


@triton.jit
def tile_indices(tile, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(rm, rn, pid_n)``: the row and column indices (int64) of tile ``tile`` of an ``M × N`` matrix in
    row-major tile order, and its column of tiles."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m = (tile // tiles_n).to(tl.int64)
    pid_n = (tile % tiles_n).to(tl.int64)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_n


@triton.jit
def tile_product(
    a_ptr, stride_a_m, stride_a_k,  # A: (M, K)
    b_ptr, stride_b_k, stride_b_n,  # B: (K, N)
    M, N, k_lo, k_hi,  # the reduction runs over k_lo ≤ k < k_hi (a slice of K, or all of it)
    tile,  # index of this tile in row-major tile order, 0 <= tile < cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)
    ROWSUM: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of A @ B over ``k_lo ≤ k < k_hi`` in the accumulator type ``ACC``, reduced in a fixed order
    (deterministic), and with ROWSUM the tile rows' sums Σ_k A[m, k]. Returns ``(acc, row_sum, rm, rn, pid_n)``:
    the tile, the row sums (zeros without ROWSUM), its row and column indices (int64) and its column of tiles.
    Reads (BLOCK_M + BLOCK_N)·(k_hi − k_lo) elements."""
    rm, rn, pid_n = tile_indices(tile, N, BLOCK_M, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = tl.arange(0, BLOCK_K).to(tl.int64) + k0
        k_mask = rk < k_hi
        a = tl.load(a_ptr + rm[:, None] * stride_a_m + rk[None, :] * stride_a_k,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_b_k + rn[None, :] * stride_b_n,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)
        if ROWSUM:
            row_sum += tl.sum(a.to(ACC), axis=1)
    return acc, row_sum, rm, rn, pid_n



@triton.jit
def split_arrive(
    part_ptr,  # this product's slice partials: S slices of (M·N tile values, then M row sums), in ACC
    counter_ptr,  # int32 arrival counter of this tile (0 between launches: the last program resets it)
    part, n_split,  # this program's slice, S
    acc, row_sum, offs, mask, m_offs, m_mask,  # this slice's tile and row sums, their offsets and masks
    M, N, with_sum,  # the product's shape; whether row sums are kept (a bias, first column of tiles)
    RESET: tl.constexpr,  # the last program resets the counter here (else after its sums: split_done)
):
    """The first half of a deterministic split reduction over K: each of the ``n_split`` programs of a tile
    stores its partial and counts its arrival (an acq_rel counter); returns whether this program is the last to
    arrive, which then sums the S partials (:func:`sum_partials`, in slice order: the same order whichever
    program arrives last, so the result bits do not depend on scheduling) — the whole tile at once
    (:func:`split_reduce`), or a part of it at a time — and resets the counter for the next launch or CUDA-graph
    replay, here with RESET or after the sums (:func:`split_done`: where it costs fewer registers)."""
    numel = M.to(tl.int64) * N
    base = part_ptr + part.to(tl.int64) * (numel + M)
    tl.store(base + offs, acc, mask=mask)
    if with_sum:
        tl.store(base + numel + m_offs, row_sum, mask=m_mask)
    tl.debug_barrier()  # every thread's partial is stored before the counter is released
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    last = arrived == n_split - 1
    if RESET:
        if last:
            split_done(counter_ptr)
    return last


@triton.jit
def split_done(counter_ptr):
    """The last program of a tile resets its arrival counter (:func:`split_arrive`): every other program has
    arrived, none reads it again in this launch."""
    tl.atomic_xchg(counter_ptr, 0, sem="relaxed")


@triton.jit
def split_reduce(
    part_ptr, counter_ptr, part, n_split,  # as in split_arrive
    acc, row_sum, offs, mask, m_offs, m_mask,  # this slice's tile and row sums, their offsets and masks
    M, N, with_sum,  # the product's shape; whether row sums are kept (a bias, first column of tiles)
):
    """A deterministic split reduction over K (:func:`split_arrive`). Returns ``(acc, row_sum, last)``: the whole
    reduction of the tile on the last program, which runs the epilogue. Loads bypass L1 (``.cg``): the other
    programs' partials are in L2."""
    last = split_arrive(part_ptr, counter_ptr, part, n_split, acc, row_sum, offs, mask, m_offs, m_mask, M, N,
                        with_sum, RESET=False)
    # the slice's own values are read back like the others': one use of the K loop's results (Triton's
    # thread-locality pass asserts on a loop reduction used twice) and one summation order for every slice
    acc = tl.zeros_like(acc)
    row_sum = tl.zeros_like(row_sum)
    if last:
        numel = M.to(tl.int64) * N
        acc, row_sum = sum_partials(part_ptr, n_split, numel + M, numel, acc, row_sum, offs, mask, m_offs, m_mask,
                                    with_sum, 1)
        split_done(counter_ptr)
    return acc, row_sum, last


@triton.jit
def sum_partials(
    part_ptr, n_parts, stride, numel,  # n_parts partials, each ``stride`` apart: M·N (= numel) values, M row sums
    acc, row_sum, offs, mask, m_offs, m_mask,  # zeros, the tile's offsets and masks in a partial
    with_sum, PARTS: tl.constexpr,  # whether row sums are summed too; partials loaded per step (in flight)
):
    """``(acc, row_sum)`` + the sums of the tile's values (and row sums) over the ``n_parts`` partials, one after
    another in partial order — the same bits from run to run, the same sums whatever PARTS: each step issues PARTS
    independent loads (in flight together) and adds them in order. Loads bypass L1 (``.cg``): other programs'
    partials are in L2."""
    for p0 in range(0, n_parts, PARTS):
        for j in tl.static_range(PARTS):
            p = p0 + j
            acc += tl.load(part_ptr + p.to(tl.int64) * stride + offs, mask=mask & (p < n_parts), other=0.0,
                           cache_modifier=".cg")
    if with_sum:  # a loop of its own: fewer registers live in each
        for p0 in range(0, n_parts, PARTS):
            for j in tl.static_range(PARTS):
                p = p0 + j
                row_sum += tl.load(part_ptr + p.to(tl.int64) * stride + numel + m_offs, mask=m_mask & (p < n_parts),
                                   other=0.0, cache_modifier=".cg")
    return acc, row_sum
