"""The weight gradients of a fused MLP of any depth in one grouped launch, with what to do with each tile:
store it (a module's backward), add it to accumulated sums, or apply the optimizer to it (the train step).

Products, for the L layers that need them (``D_i`` the pre-activation gradient of layer i — the hidden layers'
from :mod:`pyfused.kernels.rows`, ``dz`` for the last — and ``A_i`` its input, x or a hidden activation):
``dW_i = D_iᵀ A_i`` (``n_{i+1} × n_i``, reduced over the B rows) with ``db_i = Σ_rows D_i`` from the same tiles
(those of the first column), and for a module whose x needs a gradient ``dx = D_1 w_1`` (``B × n_0``). Program
ids ``[starts[i], starts[i+1])`` make layer i's ``BLOCK_MS[i] × BLOCK_N`` tiles (:func:`tile_product`), then come
the dx tiles, then, for the train step, one program for the loss. Each tile is reduced over its K (the B rows)
in a fixed order, no atomics on values: results are bit-identical from run to run. With ROW_PARTIALS the last
layer's tiles instead sum the row pass's R per-row-block partials of its dW and db (:mod:`pyfused.kernels.rows`),
in block order (:func:`pyfused.kernels.gemm.sum_partials`), and read neither dz nor ``A_L``. When the tiles alone would
leave the GPU idle (large B), each tile's reduction is split into S slices of the rows (:func:`split_count`), S
programs per tile: each stores its partial, the last to arrive sums the S partials in slice order
(:func:`pyfused.kernels.gemm.split_reduce`) and runs the epilogue — still bit-identical from run to run, for a
given S. Extra memory with S > 1: ``S·(P + n_out)`` accumulator elements per product, an int32 counter per tile
(cached, left zero by every launch, so CUDA-graph replays work); no extra launch. Summed partials (split slices or
row partials) reach the epilogue EPILOGUE_N columns of the tile at a time (:func:`summed_epilogue`), so that the
train step's wide tiles hold only that part of the tile, its parameter and its states at once; such tiles take
the split path at S = 1 too (one partial, ``P + n_out`` elements, written and read back through L2).

Epilogues (EPILOGUE):

- ``"store"``: the tile, in the parameter dtype, into a new gradient tensor;
- ``"accumulate"``: ``scale ·`` the tile written or added (``add``) into a gradient sum (the train step with a
  process group or accumulation steps; float32 for 16-bit parameters);
- ``"update"``: ``scale ·`` the tile is the gradient of that part of the parameter, which the optimizer
  (:func:`pyfused.kernels.optimizers.update_elements`: SGD or Adam/AdamW) updates there and then; the last tile
  program of a parameter advances its step / clears its first-step flag (``book``: int32 fresh flags and
  counters, 2 × 2L). With KEEP_GRAD the gradient is also written to ``grads``.

``scale = 1 / (k · divisor)``: divisor the number of counted rows ("class" loss, mean), of elements ("mse",
mean), or 1 ("sum"), from the row blocks' ``stats`` — every program sums them itself in the same order, so the
mean's divisor costs no launch — or from all-reduced ``totals`` (GLOBAL). The loss program writes
``Σ loss / divisor``.

Traffic: A_i once per row of tiles (once when ``BLOCK_MS[i] ≥ n_{i+1}``, as at the seed shape), D_i once per
column of tiles (L2 after the first), ``8·R`` bytes of stats per program; the update reads and writes each
parameter and its states once (SGD ``2·P·s`` + ``2·P·s`` with momentum; Adam ``6·P·s`` + amsgrad), the store and
accumulate epilogues write (and read) ``P`` gradient elements. Extra memory without a split: none (the caller owns
every buffer).
"""
import torch
import triton
import triton.language as tl

from .gemm import split_arrive, split_reduce, sum_partials, tile_indices, tile_product
from .launch import acc_dtype, arrival_counters, dot_block, dot_precision, launch
from .launch import sm_count as sms
from .layers import layer_input
from .optimizers import HP_WIDTH, finish_parameter, update_elements


@triton.jit
def accumulate(ptr, offs, mask, g, add):
    """``ptr[offs] = g`` (``add`` = 0, the first batch of a group) or ``ptr[offs] += g``."""
    if add != 0:
        g += tl.load(ptr + offs, mask=mask, other=0.0).to(g.dtype)
    tl.store(ptr + offs, g.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def loss_totals(stats_ptr, n_blocks, totals_ptr, GLOBAL: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr):
    """``(Σ loss, count)``: the all-reduced ``totals`` (GLOBAL), else the sums of the row blocks' ``stats``, in a
    fixed order, the same in every program."""
    if GLOBAL:
        total = tl.load(totals_ptr).to(ACC)
        count = tl.load(totals_ptr + 1).to(ACC)
    else:
        sums = tl.zeros((BLOCK_R,), dtype=ACC)
        counts = tl.zeros((BLOCK_R,), dtype=ACC)
        for r0 in range(0, n_blocks, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            sums += tl.load(stats_ptr + 2 * r, mask=r < n_blocks, other=0.0)
            counts += tl.load(stats_ptr + 2 * r + 1, mask=r < n_blocks, other=0.0)
        total = tl.sum(sums, axis=0)
        count = tl.sum(counts, axis=0)
    return total, count


@triton.jit
def gradient_scale(count, k, MEAN: tl.constexpr):
    """``1 / (k · divisor)``: divisor ``max(count, 1)`` for a mean (zero counted rows give zero gradients, as in
    torch), 1 for a sum."""
    if MEAN:
        scale = 1.0 / (tl.maximum(count, 1.0) * k)
    else:
        scale = 1.0 / (count * 0.0 + k)  # in the accumulator's type, as count is
    return scale


@triton.jit
def param_epilogue(
    g, offs, mask, j: tl.constexpr, n_programs, add,
    param_ptrs, grads, states1, states2, states3, steps, book_ptr, hp_ptr,
    N_PARAMS: tl.constexpr, EPILOGUE: tl.constexpr, OPTIMIZER: tl.constexpr, HAS_STATE: tl.constexpr,
    AMSGRAD: tl.constexpr, KEEP_GRAD: tl.constexpr,
):
    """What becomes of the gradient values ``g`` of parameter ``j`` (w_1, b_1, w_2, …) at ``offs``: see EPILOGUE
    in the module docstring. ``n_programs``: how many programs share the parameter's update."""
    if EPILOGUE == "store":
        tl.store(grads[j] + offs, g.to(grads[j].dtype.element_ty), mask=mask)
    elif EPILOGUE == "accumulate":
        accumulate(grads[j], offs, mask, g, add)
    else:
        hp = hp_ptr + j * HP_WIDTH
        update_elements(param_ptrs[j], grads[j], states1[j], states2[j], states3[j], steps[j], hp, tl.load(hp),
                        tl.load(book_ptr + j), offs, mask, g, OPTIMIZER, HAS_STATE[j], AMSGRAD[j], KEEP_GRAD)
        finish_parameter(book_ptr + N_PARAMS + j, book_ptr + j, steps[j], n_programs, OPTIMIZER)


@triton.jit
def tile_offsets(rm, rn, n_m, n_n):
    """``(offs, mask, m_mask)`` of a tile of an ``n_m × n_n`` parameter: int32 element offsets (a parameter has
    fewer than 2³¹ elements, the launcher checks: fewer registers), the tile's mask and its rows' mask."""
    m_mask = rm < n_m
    mask = m_mask[:, None] & (rn < n_n)[None, :]
    return (rm[:, None] * n_n + rn[None, :]).to(tl.int32), mask, m_mask


@triton.jit
def tile_epilogue(
    acc, row_sum, rm, rn, n_m, n_n, first_col, i: tl.constexpr, n_tiles, n_row_tiles, add, k,
    param_ptrs, grads, states1, states2, states3, steps, book_ptr, hp_ptr, stats_ptr, n_blocks, totals_ptr,
    N_LAYERS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, AMSGRAD: tl.constexpr,
    EPILOGUE: tl.constexpr, OPTIMIZER: tl.constexpr, KEEP_GRAD: tl.constexpr, MEAN: tl.constexpr,
    GLOBAL: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """A finished tile of layer ``i``'s dW (``n_m × n_n``; and, where ``first_col`` — the first columns of the
    parameter —, its db): scaled by the reduction's factor and handed to :func:`param_epilogue` (``n_tiles`` /
    ``n_row_tiles`` epilogues share each update)."""
    scale = 1.0
    if EPILOGUE != "store":  # after the K loop, so that nothing else lives across it
        total, count = loss_totals(stats_ptr, n_blocks, totals_ptr, GLOBAL, ACC, BLOCK_R)
        scale = gradient_scale(count, k, MEAN)
    offs, mask, m_mask = tile_offsets(rm, rn, n_m, n_n)  # after the statistics' loop too
    param_epilogue(acc * scale, offs, mask, 2 * i, n_tiles, add, param_ptrs, grads, states1, states2, states3,
                   steps, book_ptr, hp_ptr, 2 * N_LAYERS, EPILOGUE, OPTIMIZER, HAS_STATE, AMSGRAD, KEEP_GRAD)
    if HAS_BIAS[i]:
        if first_col:
            param_epilogue(row_sum * scale, rm.to(tl.int32), m_mask, 2 * i + 1, n_row_tiles, add, param_ptrs,
                           grads, states1, states2, states3, steps, book_ptr, hp_ptr, 2 * N_LAYERS, EPILOGUE,
                           OPTIMIZER, HAS_STATE, AMSGRAD, KEEP_GRAD)


@triton.jit
def summed_epilogue(
    part_ptr, n_parts, rm, pid_n, i: tl.constexpr, n_tiles, n_row_tiles, add, k,
    param_ptrs, grads, states1, states2, states3, steps, book_ptr, hp_ptr, stats_ptr, n_blocks, totals_ptr,
    widths, N_LAYERS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, AMSGRAD: tl.constexpr,
    EPILOGUE: tl.constexpr, OPTIMIZER: tl.constexpr, KEEP_GRAD: tl.constexpr, MEAN: tl.constexpr,
    GLOBAL: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, EPILOGUE_N: tl.constexpr, PARTS: tl.constexpr,
):
    """The tile of layer ``i``'s dW at rows ``rm`` and column ``pid_n`` of tiles summed over ``n_parts`` partials
    in memory (split slices, or the row pass's row blocks: :func:`pyfused.kernels.gemm.sum_partials`, in order)
    and handed to :func:`tile_epilogue` EPILOGUE_N columns at a time: only that much of the tile, its parameter
    and its states is live at once (TF32's 128-column update tiles fit so)."""
    n_m = widths[i + 1]
    n_n = widths[i]
    numel = n_m * n_n
    first_col = pid_n == 0  # the first column of tiles: it has the bias
    for g in tl.static_range(BLOCK_N // EPILOGUE_N):
        rn = pid_n * BLOCK_N + g * EPILOGUE_N + tl.arange(0, EPILOGUE_N)
        offs, mask, m_mask = tile_offsets(rm, rn, n_m, n_n)
        acc, row_sum = sum_partials(part_ptr, n_parts, numel + n_m, numel, tl.zeros((BLOCK_M, EPILOGUE_N), dtype=ACC),
                                    tl.zeros((BLOCK_M,), dtype=ACC), offs, mask, rm.to(tl.int32), m_mask,
                                    HAS_BIAS[i] & first_col & (g == 0), PARTS)
        tile_epilogue(acc, row_sum, rm, rn, n_m, n_n, first_col & (g == 0), i, n_tiles * (BLOCK_N // EPILOGUE_N),
                      n_row_tiles, add, k, param_ptrs, grads, states1, states2, states3, steps, book_ptr, hp_ptr,
                      stats_ptr, n_blocks, totals_ptr, N_LAYERS, HAS_BIAS, HAS_STATE, AMSGRAD, EPILOGUE, OPTIMIZER,
                      KEEP_GRAD, MEAN, GLOBAL, ACC, BLOCK_R)


@triton.jit
def grads_kernel(
    x_ptr, stride_x_row, stride_x_col,  # (B, n_0)
    acts,  # L − 1 hidden activations (B, n_i), contiguous: the inputs of layers 2 … L
    dpres,  # L pre-activation gradients (B, n_{i+1}), contiguous: the hidden layers', then dz
    ws, w_strides,  # the weights and their strides, flattened (for dx)
    dx_ptr,  # out (DX): (B, n_0) contiguous
    param_ptrs, grads, states1, states2, states3, steps,  # 2L each: w_1, b_1, … (stand-ins where absent);
    # (not named params: Triton's generated binder has a local of that name)
    book_ptr,  # (2, 2L) int32: fresh flags, then counters (EPILOGUE "update")
    hp_ptr,  # (2L, HP_WIDTH) float64 hyper-parameter rows (EPILOGUE "update")
    stats_ptr, n_blocks,  # (R, 2) per row block: Σ loss, count (EPILOGUE "update" / "accumulate")
    totals_ptr,  # (2,) Σ loss, count over every rank (GLOBAL)
    loss_ptr,  # out: 0-dim loss (LOSS_PROGRAM)
    k, add,  # divide the gradients by k too; "accumulate": whether to add to the sums
    n_rows, widths, starts,  # L + 1 feature counts; L + 2 program-id starts (layers, dx, loss program)
    parts, counters_ptr,  # SPLIT: L slice-partial buffers (ACC), int32 tile counters (zeros between launches)
    splits, chunks, counter_starts,  # SPLIT: per layer S, rows per slice, first counter of its tiles
    lp_ptr, n_lp,  # ROW_PARTIALS: the row pass's per-row-block partials of the last layer's dW and db, R of them
    N_LAYERS: tl.constexpr, NEED: tl.constexpr, HAS_BIAS: tl.constexpr,  # tuples of L
    HAS_STATE: tl.constexpr, AMSGRAD: tl.constexpr,  # tuples of 2L
    DX: tl.constexpr, EPILOGUE: tl.constexpr, OPTIMIZER: tl.constexpr, KEEP_GRAD: tl.constexpr,
    LOSS_PROGRAM: tl.constexpr, MEAN: tl.constexpr, GLOBAL: tl.constexpr, ACC: tl.constexpr,
    SPLIT: tl.constexpr,  # per layer: whether its tiles' reductions are split (S = splits[i] > 1)
    ROW_PARTIALS: tl.constexpr,  # the last layer's tiles sum the row pass's R partials (no reduction over B)
    PARTS: tl.constexpr,  # ROW_PARTIALS: partials loaded per step
    BLOCK_MS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DX: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    EPILOGUE_N: tl.constexpr,  # columns of a tile summed from partials per epilogue step (divides BLOCK_N)
):
    """One tile of one product (module docstring), or the loss."""
    pid = tl.program_id(0)
    for i in tl.static_range(N_LAYERS):
        if NEED[i]:
            if (pid >= starts[i]) & (pid < starts[i + 1]):
                tile = pid - starts[i]
                k_lo = 0
                k_hi = n_rows
                if SPLIT[i]:  # S programs per tile, each reducing a slice of the rows (split_reduce)
                    part = tile % splits[i]
                    tile = tile // splits[i]
                    k_lo = part * chunks[i]
                    k_hi = tl.minimum(k_lo + chunks[i], n_rows)
                n_tiles = (starts[i + 1] - starts[i]) // splits[i] if SPLIT[i] else starts[i + 1] - starts[i]
                n_row_tiles = tl.cdiv(widths[i + 1], BLOCK_MS[i])
                if ROW_PARTIALS and i == N_LAYERS - 1:  # the sum of the row blocks' partials, in block order
                    rm, rn, pid_n = tile_indices(tile, widths[i], BLOCK_MS[i], BLOCK_N)
                    summed_epilogue(lp_ptr, n_lp, rm, pid_n, i, n_tiles, n_row_tiles, add, k, param_ptrs, grads,
                                    states1, states2, states3, steps, book_ptr, hp_ptr, stats_ptr, n_blocks,
                                    totals_ptr, widths, N_LAYERS, HAS_BIAS, HAS_STATE, AMSGRAD, EPILOGUE, OPTIMIZER,
                                    KEEP_GRAD, MEAN, GLOBAL, ACC, BLOCK_R, BLOCK_MS[i], BLOCK_N, EPILOGUE_N, PARTS)
                else:
                    src, s_row, s_col = layer_input(x_ptr, stride_x_row, stride_x_col, acts, widths, i)
                    acc, row_sum, rm, rn, pid_n = tile_product(
                        dpres[i], 1, widths[i + 1], src, s_row, s_col, widths[i + 1], widths[i], k_lo, k_hi,
                        tile, HAS_BIAS[i], ACC, BLOCK_MS[i], BLOCK_N, BLOCK_K, PRECISION)
                    if SPLIT[i]:  # the last of the tile's S programs sums their partials and runs the epilogue
                        offs, mask, m_mask = tile_offsets(rm, rn, widths[i + 1], widths[i])
                        if EPILOGUE_N < BLOCK_N:  # the sums and the epilogue a part of the tile at a time
                            last = split_arrive(parts[i], counters_ptr + counter_starts[i] + tile, part, splits[i],
                                                acc, row_sum, offs, mask, rm.to(tl.int32), m_mask, widths[i + 1],
                                                widths[i], HAS_BIAS[i] & (pid_n == 0), RESET=True)
                            if last:
                                summed_epilogue(parts[i], splits[i], rm, pid_n, i, n_tiles, n_row_tiles, add, k,
                                                param_ptrs, grads, states1, states2, states3, steps, book_ptr, hp_ptr,
                                                stats_ptr, n_blocks, totals_ptr, widths, N_LAYERS, HAS_BIAS,
                                                HAS_STATE, AMSGRAD, EPILOGUE, OPTIMIZER, KEEP_GRAD, MEAN, GLOBAL, ACC,
                                                BLOCK_R, BLOCK_MS[i], BLOCK_N, EPILOGUE_N, 1)
                        else:  # the whole tile (summed in the same order: the same bits; as parts, a few
                            # launches spill 4–8 B)
                            acc, row_sum, last = split_reduce(
                                parts[i], counters_ptr + counter_starts[i] + tile, part, splits[i], acc, row_sum,
                                offs, mask, rm.to(tl.int32), m_mask, widths[i + 1], widths[i],
                                HAS_BIAS[i] & (pid_n == 0))
                            if last:
                                tile_epilogue(acc, row_sum, rm, rn, widths[i + 1], widths[i], pid_n == 0, i, n_tiles,
                                              n_row_tiles, add, k, param_ptrs, grads, states1, states2, states3,
                                              steps, book_ptr, hp_ptr, stats_ptr, n_blocks, totals_ptr, N_LAYERS,
                                              HAS_BIAS, HAS_STATE, AMSGRAD, EPILOGUE, OPTIMIZER, KEEP_GRAD, MEAN,
                                              GLOBAL, ACC, BLOCK_R)
                    else:  # no runtime branch around the epilogue: one more spills in the 16-bit update on sm_80
                        tile_epilogue(acc, row_sum, rm, rn, widths[i + 1], widths[i], pid_n == 0, i, n_tiles,
                                      n_row_tiles, add, k, param_ptrs, grads, states1, states2, states3, steps,
                                      book_ptr, hp_ptr, stats_ptr, n_blocks, totals_ptr, N_LAYERS, HAS_BIAS, HAS_STATE,
                                      AMSGRAD, EPILOGUE, OPTIMIZER, KEEP_GRAD, MEAN, GLOBAL, ACC, BLOCK_R)
    if DX:
        if (pid >= starts[N_LAYERS]) & (pid < starts[N_LAYERS + 1]):
            acc, _, rm, rn, _ = tile_product(dpres[0], widths[1], 1, ws[0], w_strides[0], w_strides[1], n_rows,
                                             widths[0], 0, widths[1], pid - starts[N_LAYERS], False, ACC,
                                             BLOCK_DX, BLOCK_DX, BLOCK_K, PRECISION)
            tl.store(dx_ptr + rm[:, None] * widths[0] + rn[None, :], acc.to(dx_ptr.dtype.element_ty),
                     mask=(rm < n_rows)[:, None] & (rn < widths[0])[None, :])
    if LOSS_PROGRAM:
        if pid == starts[N_LAYERS + 1]:
            total, count = loss_totals(stats_ptr, n_blocks, totals_ptr, GLOBAL, ACC, BLOCK_R)
            if MEAN:
                total = total / count
            tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


PARTS_PER_STEP = 8  # row partials in flight per step of the last layer's sum (row_partials)
WIDE_FROM = 4096  # rows past which the train step's tiles are wider (fewer re-reads of D_i from L2)


def grads_config(n_rows: int, widths: tuple, dtype: torch.dtype, epilogue: str, precision: str = "ieee",
                 optimizer: str = "sgd") -> dict:
    """Launch configuration of :func:`grads_kernel`, from the compile report (no spills at the seed shapes on
    sm_80 and sm_90, with Triton 3.6's and 3.8's ptxas, whose register allocation differs).

    - ``"store"`` (a module's backward): 32 × 32 tiles, K steps of 32 (16 in float64), 4 warps, 2 stages — 3 in
      16-bit dtypes and float64 (at 2, dx in fp16 spills 4 B on sm_90 once the reduction is split, float64
      4 B at 1000 → 100 on sm_90 with Triton 3.6; at 3, TF32 8 B at 16384 × 20 → 13 → 8 → 3); dx tiles
      32 × 32.
    - the train step: per layer, tiles as tall as its output (up to 128 rows for hidden layers — 64 in float64 —
      and 64 for the last, so its input is read once) by 16 columns (twice the programs of 32 columns, for an
      SM-starved launch); past WIDE_FROM rows in TF32 and 16-bit dtypes (where the split reduction fills the GPU
      and each program's re-read of D_i from L2 is what binds: ``python -m bench.model``) 128 columns and 16
      warps for ``"update"`` and ``"accumulate"`` (an eighth of the re-reads), their partials summed and the
      epilogue run EPILOGUE_N columns at a time (:func:`summed_epilogue`, through the partials buffer even at
      S = 1): whole tiles for SGD in 16-bit dtypes, 64 columns for SGD in TF32 (whole, 24–164 B spill: only that
      much of the tile, parameter and momentum is live at once), 32 for Adam (whole, 472–552 B in bf16) and the
      accumulation (the model: TF32 at 16384 rows and hidden 1024 launch 2 130.9 → 91.9 µs, at 64-column tiles
      before) — all only where the layers' inputs are multiples of 16 wide (the course's 1000 → 100 spills
      28–1844 B at 64 or 128 columns, 20 → 13 → 8 8–16 B: they keep 16); fp32 IEEE keeps 16: it is FMA-bound
      there, and its update epilogue at 32 columns spills on sm_80. ``"update"`` with K steps of 32 and 4 warps
      at 16 columns; up to 16 rows K steps of 16 (at 32 a 1-row step spilled 8 B on sm_90). Over the report's
      252 update launches of 16 columns, 4 warps and 2 stages leave 3 spilling 4–8 B (Adam in fp32 at
      64 × 1000 → 100, fp16 at 128 × 16 → 128, fp64 at 128 × 784 → 16); 8 warps spill at 10 others, 8 warps with
      K steps of 16 at 9, 1 stage everywhere at none, but it gives up the K loop's pipelining. So: float64 (a
      correctness dtype, FMA-bound) takes 1 stage, Adam K steps of 16 (its two moments: none of its 40 spills;
      32 in TF32), SGD in 16-bit dtypes and TF32 3 stages (none of them spills; TF32 at 2 spilled 4 B at
      1000 → 100 on sm_80 with Triton 3.6), and float64 SGD past 16 rows 2 warps (with 4, Triton 3.6's ptxas
      spilled 48–96 B on sm_90 at 20 → 13 → 8 → 3 and 784 → 16 → 10; six variants with 4 or 8 warps that were
      clean there each spilled 4–12 B elsewhere in 3.6 or 3.8).
      ``"accumulate"`` with K steps of 16 (32 in float64 up to 16 rows: one step either way, and 16 spilled 16 B
      at 1 row on sm_80 with Triton 3.6) and 8 warps (the other pairings spill a few bytes in the epilogue). The
      statistics are summed ``BLOCK_R`` row blocks at a time: 16 (one step at the seed shape) up to 256 for large
      batches.
    """
    last = len(widths) - 2
    if epilogue == "store":
        return dict(BLOCK_MS=(32,) * (last + 1), BLOCK_N=32, BLOCK_K=16 if dtype == torch.float64 else 32,
                    BLOCK_DX=32, BLOCK_R=16, EPILOGUE_N=32, num_warps=4,
                    num_stages=3 if dtype.itemsize in (2, 8) else 2)
    cap = 64 if dtype == torch.float64 else 128
    block_r = min(256, max(16, triton.next_power_of_2(triton.cdiv(max(n_rows, 1), 16))))
    update = epilogue == "update"
    wide_ok = dtype.itemsize == 2 or precision == "tf32"  # fp32 IEEE's update at 32 columns spills 96 B on sm_80
    aligned = all(n % 16 == 0 for n in widths[:-1])  # unaligned (the course's 1000 → 100, 20 → 13 → 8) spill
    wide = n_rows > WIDE_FROM and wide_ok and aligned
    block_n = 128 if wide else 16
    # the wide tiles sum their partials and run the epilogue a part at a time (whole, they spill), but for SGD in
    # 16-bit dtypes: SGD 64 columns in TF32, Adam and the accumulation 32
    sgd = update and optimizer == "sgd"
    if not wide or (sgd and dtype.itemsize == 2):
        epilogue_n = block_n
    else:
        epilogue_n = 64 if sgd else 32
    block_k, stages = dot_block(n_rows, 32) if update else 16, 2
    if epilogue == "accumulate" and dtype == torch.float64 and n_rows <= 16:  # one K step either way: 16 spilled
        block_k = 32  # 16 B at a 1-row step on sm_80 with Triton 3.6
    num_warps = 4 if update and block_n < 64 else 16 if block_n == 128 else 8
    if update and block_n == 16:  # the update tiles' rules by dtype and optimizer (see above)
        if dtype == torch.float64:
            stages = 1
            if optimizer == "sgd" and n_rows > 16:  # 2 warps (4 spilled 48-96 B on sm_90 with Triton 3.6; at up
                num_warps = 2  # to 16 rows 2 spilled 8 B with 3.8)
        elif optimizer != "sgd":  # Adam: K steps of 16, but 32 in TF32 (16 spilled 4 B at 784 -> 16 -> 10 on sm_90
            block_k = dot_block(n_rows, 32 if precision == "tf32" else 16)  # with Triton 3.8)
        elif dtype.itemsize == 2 or precision == "tf32":
            stages = 3
    return dict(BLOCK_MS=tuple(dot_block(n, min(cap, 64) if i == last else cap) for i, n in enumerate(widths[1:])),
                BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_DX=32, BLOCK_R=block_r, EPILOGUE_N=epilogue_n,
                num_warps=num_warps, num_stages=stages)


MIN_SLICE_ROWS = 256  # a slice of the rows reduces at least this many (the partials' traffic stays small)
MAX_SLICE_ROWS = 4096  # and at most this many (more programs, in balance over the SMs), but see split_count
MAX_SPLIT = 64


def resident_programs(cfg: dict, epilogue: str) -> int:
    """Programs of :func:`grads_kernel` an SM holds at once, as :func:`split_count` counts them: 1 for the train
    step's wide tiles (128 columns: 108–128 registers × 512 threads, one block per SM in the compile report),
    else 2 (3–7 fit)."""
    return 1 if epilogue != "store" and cfg["BLOCK_N"] >= 64 else 2


def slice_rows(n_rows: int, split: int, block_k: int) -> int:
    """Rows per slice of a reduction over ``n_rows`` split ``split`` ways: a multiple of ``block_k`` (each slice's
    K loop is whole steps); ``cdiv(n_rows, slice_rows(...))`` is the S that covers the rows."""
    return triton.cdiv(triton.cdiv(max(n_rows, 1), split), block_k) * block_k


def split_count(n_rows: int, n_tiles: int, device: torch.device, sm_count: int | None = None,
                whole_waves: bool = False, tensor_cores: bool = False, resident: int = 2) -> int:
    """S, the slices each weight-gradient tile's reduction over the B rows is split into, when the tiles alone
    leave SMs idle (fewer tiles than SMs): enough programs to fill the GPU twice over — with ``whole_waves``
    (the train step, and its loss program) no more than fit one wave of ``resident`` programs per SM
    (:func:`resident_programs`), since a further wave of a few programs costs a whole chain (bf16 at 16384
    rows, hidden 128, one program per SM: S = 32 → 16, launch 2 14.5 → 9.8 µs predicted); with
    ``tensor_cores`` too (TF32, 16-bit dtypes), once the tiles fill half of the SMs, only that one wave (the
    course's regression, 1000 → 100 → 10 at 16384 rows: 70 tiles of 16 columns, S = 1 → 3, launch 2 63.9 →
    26.9 µs in bf16, 125.4 → 43.9 with Adam, 63.9 → 51.4 in TF32 predicted; it was not split at all, by a rule
    made for 120 tiles of 64 columns at hidden 1024 in TF32, bound by L2, that now take 128 columns) — and no
    slice longer than MAX_SLICE_ROWS (but for the wide tiles of one program per SM: past one wave the waves multiply
    back the chain that more slices shorten, and the partials only add traffic — bf16 at hidden 1024, 64 tiles:
    S = 16 → 2 at 65536 rows, launch 2 206.4 → 194.4 µs predicted, 4 → 2 at 16384, 52.5 → 51.1), none shorter
    than MIN_SLICE_ROWS, at most MAX_SPLIT (with a full grid the partials' traffic would cost more than the
    parallelism brings: ``python -m bench.model``). ``sm_count``
    stands for a GPU of that many SMs (the compile report); without it, 1 (no split) off CUDA — Triton's
    interpreter runs programs one after another, and tests pass ``split`` to :func:`grads` to take the split
    path there."""
    sm_count = sms(device, sm_count)
    if sm_count is None:
        return 1
    if n_tiles == 0 or n_tiles >= sm_count:
        return 1
    fill = (resident * sm_count - 1) // n_tiles if whole_waves else triton.cdiv(2 * sm_count, n_tiles)
    if whole_waves and (resident == 1 or (tensor_cores and 2 * n_tiles > sm_count)):
        want = fill  # one wave exactly: past it more slices only add partials (see above)
    else:
        want = max(fill, triton.cdiv(n_rows, MAX_SLICE_ROWS))
    return max(1, min(want, triton.cdiv(n_rows, MIN_SLICE_ROWS), MAX_SPLIT))


def tile_counts(widths: tuple, cfg: dict, need=None) -> list:
    """The dW tiles of each layer (0 where ``need`` says no gradient) for a :func:`grads_config` ``cfg``: what
    :func:`split_count` is given, and, times S, each layer's share of the grid."""
    return [triton.cdiv(widths[i + 1], cfg["BLOCK_MS"][i]) * triton.cdiv(widths[i], cfg["BLOCK_N"])
            if need is None or need[i] else 0 for i in range(len(widths) - 1)]


def _filled(tensors, stand_in, n):
    tensors = list(tensors) if tensors is not None else [None] * n
    return tuple(stand_in if t is None else t for t in tensors)


def grads(x, weights, acts, dpres, *, need, has_bias, epilogue="store", grads=None, dx=None, params=None,
          states=((), (), ()), steps=None, book=None, hp=None, optimizer="sgd", has_state=None, amsgrad=None,
          keep_grad=False, stats=None, totals=None, loss=None, mean=True, k=1, add=False, split=None,
          sm_count=None, row_partials=None):
    """Launch :func:`grads_kernel`. ``need``/``has_bias``: L flags; ``acts``: L − 1 hidden activations; ``dpres``:
    the L pre-activation gradients (dz last); ``grads``: 2L tensors shaped like the parameters (w_1, b_1, …; None
    where not made): the outputs ("store", "accumulate"; the kept gradients of "update" with ``keep_grad``);
    ``dx``: (B, n_0) output, or None. "update": ``params``, ``states`` (three lists of 2L, None where absent),
    ``steps`` (2L, Adam), ``book``, ``hp``, the optimizer's flags. "update"/"accumulate": ``stats`` (R, 2) or
    ``totals`` (2,), ``loss`` a 0-dim output, ``mean``, ``k``, ``add``. ``split``: S (one int, or one per layer)
    for the reduction over the rows, :func:`split_count` (for ``sm_count`` SMs when given) when None.
    ``row_partials``: the row pass's (R, n_L·n_{L−1} + n_L) partials of the last layer's gradient
    (:func:`pyfused.kernels.rows.rows`), which its tiles then sum (in row-block order) instead of reducing
    ``dpres[-1]ᵀ acts[-1]`` over the B rows: neither is read."""
    n_rows = x.shape[0]
    widths = (x.shape[1], *(w.shape[0] for w in weights))
    n_layers = len(weights)
    precision = dot_precision(x.dtype, x.device)
    cfg = grads_config(n_rows, widths, x.dtype, epilogue, precision, optimizer)
    tiles = tile_counts(widths, cfg, need)
    if split is None:
        split = split_count(n_rows, sum(tiles), x.device, sm_count, whole_waves=epilogue != "store",
                            tensor_cores=precision == "tf32" or x.dtype.itemsize == 2,
                            resident=resident_programs(cfg, epilogue))
    splits = (split,) * n_layers if isinstance(split, int) else tuple(split)
    if row_partials is not None:  # the last layer's reduction over the rows is done: its tiles sum R partials
        if row_partials.dim() != 2 or row_partials.shape[1] != widths[-1] * widths[-2] + widths[-1]:
            raise ValueError(f"row_partials: expected (R, {widths[-1] * widths[-2] + widths[-1]}), got "
                             f"{tuple(row_partials.shape)}")
        splits = (*splits[:-1], 1)
    chunks = tuple(slice_rows(n_rows, s, cfg["BLOCK_K"]) for s in splits)
    splits = tuple(triton.cdiv(max(n_rows, 1), c) for c in chunks)
    starts, counter_starts = [0], [0]
    for i in range(n_layers):
        starts.append(starts[-1] + tiles[i] * splits[i])
        counter_starts.append(counter_starts[-1] + tiles[i])
    dx_tiles = triton.cdiv(n_rows, cfg["BLOCK_DX"]) * triton.cdiv(widths[0], cfg["BLOCK_DX"]) if dx is not None else 0
    starts.append(starts[-1] + dx_tiles)
    loss_program = epilogue != "store"
    total = starts[-1] + int(loss_program)
    if total == 0:
        return
    stand_in = x
    n_params = 2 * n_layers
    # a layer whose epilogue runs on part of a tile at a time (EPILOGUE_N) takes the split path even with S = 1:
    # its tiles go through the partials buffer (P + n_{i+1} elements, in L2) and are summed back in parts
    # (not the last layer's with row partials: it sums those, S = 1)
    by_parts = cfg["EPILOGUE_N"] < cfg["BLOCK_N"]
    summed = [row_partials is not None and i == n_layers - 1 for i in range(n_layers)]
    split_layers = tuple(bool(t) and not r and (s > 1 or by_parts) for s, t, r in zip(splits, tiles, summed))
    split_any = any(split_layers)
    parts = [stand_in] * n_layers
    counters = stand_in
    if split_any:  # S · (P_i + n_{i+1}) accumulator elements per split layer, and one counter per tile
        for i in range(n_layers):
            if split_layers[i]:
                parts[i] = torch.empty(splits[i] * (widths[i + 1] * widths[i] + widths[i + 1]),
                                       dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        counters = arrival_counters("grads", x.device, counter_starts[-1])
    launch(grads_kernel, (total,), x.device,
           x, x.stride(0), x.stride(1), _filled(acts, stand_in, n_layers - 1), _filled(dpres, stand_in, n_layers),
           tuple(weights), tuple(s for w in weights for s in w.stride()), stand_in if dx is None else dx,
           _filled(params, stand_in, n_params), _filled(grads, stand_in, n_params),
           *(_filled(s or None, stand_in, n_params) for s in states), _filled(steps, stand_in, n_params),
           stand_in if book is None else book, stand_in if hp is None else hp,
           stand_in if stats is None else stats, 0 if stats is None else stats.shape[0],
           stand_in if totals is None else totals, stand_in if loss is None else loss,
           k, int(add), n_rows, widths, tuple(starts), tuple(parts), counters, splits, chunks,
           tuple(counter_starts[:-1]), stand_in if row_partials is None else row_partials,
           0 if row_partials is None else row_partials.shape[0],
           N_LAYERS=n_layers, NEED=tuple(bool(n) for n in need), HAS_BIAS=tuple(has_bias),
           HAS_STATE=tuple(has_state or (False,) * n_params), AMSGRAD=tuple(amsgrad or (False,) * n_params),
           DX=dx is not None, EPILOGUE=epilogue, OPTIMIZER=optimizer, KEEP_GRAD=keep_grad,
           LOSS_PROGRAM=loss_program, MEAN=mean, GLOBAL=totals is not None, ACC=acc_dtype(x.dtype),
           SPLIT=split_layers, ROW_PARTIALS=row_partials is not None, PARTS=PARTS_PER_STEP,
           PRECISION=precision, **cfg)
