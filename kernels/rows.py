"""The row pass of a fused MLP of any depth: forward, head and loss, and the row-local half of the backward, for
``BLOCK_M`` rows per program, in one launch.

Network: ``L`` nn.Linear layers (``w_i`` of shape ``(n_{i+1}, n_i)``, optional bias), an activation after each
but the last (relu or sigmoid), and a head: ``log_softmax`` or the ``logits`` themselves. ``a_0 = x``,
``a_i = act_i(a_{i−1} w_iᵀ + b_i)`` for the ``L − 1`` hidden layers, ``z = a_{L−1} w_Lᵀ + b_L``.

A program walks its rows through the network with the building blocks of :mod:`pyfused.kernels.layers`:

1. *forward* (FORWARD): hidden layers ``1 … L−2`` slice by slice (``BLOCK_H`` features), each stored to its
   activation buffer and read back by the next layer (the program's own rows: L1/L2); the last hidden layer
   slice by slice too, each slice multiplied at once into the logits ``z += a_{L−1}[:, slice] w_L[:, slice]ᵀ``
   (stored only when kept for backward);
2. *head and loss* (:mod:`pyfused.kernels.heads`): log-probabilities or logits stored (STORE_OUT); with a loss
   its value per row or element (LOSS_OUT), its sum and count per row block (STATS, ``(R, 2)``: the mean's
   divisor costs no launch), and the unscaled logit gradient ``dz`` (STORE_DZ);
   without FORWARD (a module's backward) ``dz`` comes from the incoming gradient (GRAD_IN): the saved logit
   gradient times its scale (``"dlogits"``), ``dy − exp(y)·Σ dy`` through a log_softmax head, or ``dy`` itself;
3. *backward rows* (BACKWARD): the pre-activation gradient of every hidden layer down to layer ``LOWEST + 1``,
   ``d_{L−1} = act'(dz w_L)``, ``d_i = act'(d_{i+1} w_{i+1})``, each read off the saved activations (relu
   ``[a > 0]``, sigmoid ``(1 − a)·a``), stored for the weight-gradient launch (:mod:`pyfused.kernels.grads`);
   with ROW_PARTIALS (the train step's large-batch tiles, :func:`row_partials_pay`) also the last layer's weight
   gradient of the block's rows, ``dz_bᵀ a_{L−1,b}`` slice by slice as each slice of ``a_{L−1}`` is read back,
   and ``Σ_rows dz_b``: R partials that the weight-gradient launch sums, in block order, instead of reducing
   over the B rows (it then reads neither ``a_{L−1}`` nor dz, and dz is not stored).

With HSPLIT (a two-layer forward at small B, :func:`hidden_split`) the G programs of a row block share its
hidden layer: each makes its share of the slices (activations stored) and its partial of the logits, the last
of them to arrive sums the G partials in group order (:func:`pyfused.kernels.gemm.split_reduce`: bit-identical
from run to run for a given G) and runs phases 2 and 3 for the block — G times the SMs, a G-times shorter chain
of dependent K-steps before the head.

The train step is one launch of all three (its weight gradients and update are the next launch); a module's
forward is (1, 2) and its backward (2, 3) then :mod:`pyfused.kernels.grads`.

Memory (B rows, s bytes per element, hidden widths ``n_1 … n_{L−1}``, ``n_L = out`` ≤ 1024): reads ``B·n_0·s``
of x per slice of the first layer, each weight once per program (L2 after the first), its own activations again
(L1/L2); writes ``B·Σ n_i·s`` of activations (and as much of pre-activation gradients with BACKWARD), ``B·out·s``
for the output / dz, ``4B`` or ``B·out·4`` for loss values, ``8·R`` for stats. Registers: a ``BLOCK_M × BLOCK_OUT``
accumulator for the logits.
"""
import torch
import triton
import triton.language as tl

from .activation import activate, activation_grad
from .gemm import split_reduce
from .heads import class_loss, load_class_target, log_softmax_rows, squared_error
from .launch import acc_dtype, arrival_counters, dot_block, dot_precision, launch
from .launch import sm_count as sms
from .layers import grad_slice, layer_input, linear_slice

MAX_OUT = 1024  # the widest logits tile (16-bit dtypes); see max_out


def max_out(dtype: torch.dtype) -> int:
    """The most output features the row kernel takes for ``dtype``: its logits tile (``BLOCK_M × out``) stays in
    registers and shared memory — 1024 for 16-bit dtypes, 512 for float32 (the train step at 1024 spills 8–168 B
    on sm_80 and sm_90), 256 for float64 (at 512 it spills 72–92 B; at 1024 it needs 258 KB of shared memory, more
    than an SM has). Wider nets take the torch path (:func:`pyfused.backend.use_triton`)."""
    return MAX_OUT >> {8: 2, 4: 1}.get(dtype.itemsize, 0)


@triton.jit
def rows_kernel(
    x_ptr, stride_x_row, stride_x_col,  # (B, n_0)
    ws, w_strides, bs,  # L weights (n_{i+1}, n_i); their (row, col) strides, flattened; L biases (stand-ins)
    acts,  # L − 1 hidden activations (B, n_i), contiguous: written by FORWARD, read by BACKWARD
    dpres,  # L − 1 pre-activation gradients of the hidden layers (B, n_i), contiguous (BACKWARD)
    widths,  # L + 1 feature counts n_0 … n_L
    out_ptr,  # (B, n_L) contiguous, log-probabilities or logits (STORE_OUT); x's dtype or float32 (autocast)
    target_ptr, stride_t_row, stride_t_col,  # LOSS "class": (B,) integer classes; "mse": (B, n_L) floats
    ignore_index,
    loss_ptr,  # LOSS_OUT: (B,) nll per row ("class"), (B, n_L) squared errors ("mse"); float32 (float64)
    stats_ptr,  # STATS: (R, 2) per row block: Σ loss, number of counted rows ("class") or elements ("mse")
    g_ptr, stride_g_row, stride_g_col,  # not FORWARD: (B, n_L) incoming gradient (dy or the saved dz)
    y_ptr,  # GRAD_IN "dy" with a log_softmax head: the saved log-probabilities (B, n_L) contiguous
    scale_ptr, stride_s_row, stride_s_col,  # GRAD_IN "dlogits": the factor of each element of the saved dz
    dz_ptr,  # STORE_DZ: (B, n_L) contiguous logit gradient
    parts_ptr, counters_ptr,  # HSPLIT: R·G logit partials (BLOCK_M × BLOCK_OUT, ACC); R int32 counters (zeros)
    lp_ptr,  # ROW_PARTIALS: (R, n_L·n_{L−1} + n_L) ACC, per row block dz_bᵀ a_{L−1,b} then Σ_rows dz_b
    n_groups, group_cols,  # HSPLIT: G programs per row block, each taking group_cols of the last hidden layer
    n_rows,
    N_LAYERS: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATIONS: tl.constexpr,  # tuples of L and L − 1
    HEAD: tl.constexpr, LOSS: tl.constexpr,  # "log_softmax" | "logits";  "none" | "class" | "mse"
    FORWARD: tl.constexpr, STORE_LAST: tl.constexpr, STORE_OUT: tl.constexpr, LOSS_OUT: tl.constexpr,
    STATS: tl.constexpr, STORE_DZ: tl.constexpr, BACKWARD: tl.constexpr, GRAD_IN: tl.constexpr,
    LOWEST: tl.constexpr,  # BACKWARD makes the gradients of hidden layers LOWEST … L − 2 (0-based)
    RAGGED_LAST: tl.constexpr,  # the last hidden width is not a multiple of BLOCK_H (padding columns to zero)
    HSPLIT: tl.constexpr,  # FORWARD, two layers: G programs per row block share the hidden layer (split_reduce)
    ROW_PARTIALS: tl.constexpr,  # BACKWARD: the last layer's weight (and bias) gradient of the block's rows
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Forward, head, loss and backward rows of BLOCK_M rows (the phases of the module docstring)."""
    pid = tl.program_id(0)
    block = pid  # the row block
    h_lo = 0  # the slice of the last hidden layer this program makes: [h_lo, h_hi)
    h_hi = widths[N_LAYERS - 1]
    if HSPLIT:
        block = pid // n_groups
        group = pid % n_groups
        h_lo = group * group_cols
        h_hi = tl.minimum(h_lo + group_cols, h_hi)
    rows = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    last: tl.constexpr = N_LAYERS - 1  # index of the output layer
    n_out = widths[N_LAYERS]
    n_last = widths[last]  # width of the last hidden layer
    cols = tl.arange(0, BLOCK_OUT)
    col_mask = cols < n_out
    out_mask = row_mask[:, None] & col_mask[None, :]
    out_offs = rows[:, None] * n_out + cols[None, :]
    dtype = x_ptr.dtype.element_ty
    out_dtype = out_ptr.dtype.element_ty
    last_in = True  # whether this program finishes its rows: always, but for the first G − 1 programs of a split
    if FORWARD:
        for i in tl.static_range(N_LAYERS - 2):  # hidden layers before the last: stored, read back by the next
            src, s_row, s_col = layer_input(x_ptr, stride_x_row, stride_x_col, acts, widths, i)
            for n0 in range(0, widths[i + 1], BLOCK_H):
                hs = n0 + tl.arange(0, BLOCK_H)
                h_mask = hs < widths[i + 1]
                acc = linear_slice(src, s_row, s_col, ws[i], w_strides[2 * i], w_strides[2 * i + 1], bs[i],
                                   rows, row_mask, hs, h_mask, widths[i], HAS_BIAS[i], ACC,
                                   BLOCK_M, BLOCK_H, BLOCK_K, PRECISION)
                tl.store(acts[i] + rows[:, None] * widths[i + 1] + hs[None, :],
                         activate(acc, tl.constexpr(ACTIVATIONS[i])).to(dtype),
                         mask=row_mask[:, None] & h_mask[None, :])
            tl.debug_barrier()  # the next layer reads what the other threads of this program stored
        src, s_row, s_col = layer_input(x_ptr, stride_x_row, stride_x_col, acts, widths, last - 1)
        z = tl.zeros((BLOCK_M, BLOCK_OUT), dtype=ACC)
        for n0 in range(h_lo, h_hi, BLOCK_H):  # the last hidden layer, each slice multiplied into the logits
            hs = n0 + tl.arange(0, BLOCK_H)
            h_mask = hs < n_last
            acc = linear_slice(src, s_row, s_col, ws[last - 1], w_strides[2 * last - 2], w_strides[2 * last - 1],
                               bs[last - 1], rows, row_mask, hs, h_mask, widths[last - 1], HAS_BIAS[last - 1], ACC,
                               BLOCK_M, BLOCK_H, BLOCK_K, PRECISION)
            h = activate(acc, tl.constexpr(ACTIVATIONS[last - 1]))
            if RAGGED_LAST:  # padding columns: 0, not act(inf·0), a NaN that would reach every logit of its row
                h = tl.where(h_mask[None, :], h, 0.0)
            h = h.to(dtype)
            if STORE_LAST:
                tl.store(acts[last - 1] + rows[:, None] * n_last + hs[None, :], h,
                         mask=row_mask[:, None] & h_mask[None, :])
            wt = tl.load(ws[last] + cols[None, :] * w_strides[2 * last] + hs[:, None] * w_strides[2 * last + 1],
                         mask=h_mask[:, None] & col_mask[None, :], other=0.0)
            z = tl.dot(h, wt, z, input_precision=PRECISION, out_dtype=ACC)
        if HSPLIT:  # the last of the row block's G programs to arrive sums the logit partials in group order
            tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_OUT + cols[None, :]
            z, _, last_in = split_reduce(
                parts_ptr + block.to(tl.int64) * n_groups * (BLOCK_M * BLOCK_OUT + BLOCK_M), counters_ptr + block,
                group, n_groups, z, tl.zeros((BLOCK_M,), dtype=ACC), tile, tile >= 0, tl.arange(0, BLOCK_M),
                row_mask, tl.full((), BLOCK_M, tl.int32), BLOCK_OUT, False)
    if last_in:
        if FORWARD:
            if HAS_BIAS[last]:
                z += tl.load(bs[last] + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
            if LOSS == "mse":
                t = tl.load(target_ptr + rows[:, None] * stride_t_row + cols[None, :] * stride_t_col, mask=out_mask,
                            other=0.0).to(ACC)
                value, dz = squared_error(z, t, out_mask)
                if STORE_OUT:
                    tl.store(out_ptr + out_offs, z.to(out_dtype), mask=out_mask)
                if LOSS_OUT:
                    tl.store(loss_ptr + out_offs, value.to(loss_ptr.dtype.element_ty), mask=out_mask)
                if STATS:
                    tl.store(stats_ptr + 2 * block, tl.sum(tl.sum(value, axis=1), axis=0))
                    tl.store(stats_ptr + 2 * block + 1, tl.sum(tl.sum(out_mask.to(ACC), axis=1), axis=0))
            elif LOSS == "class" or HEAD == "log_softmax":
                y, p = log_softmax_rows(z, col_mask)
                if STORE_OUT:
                    tl.store(out_ptr + out_offs, (y if HEAD == "log_softmax" else z).to(out_dtype), mask=out_mask)
                if LOSS == "class":
                    t, keep = load_class_target(target_ptr, stride_t_row, rows, row_mask, ignore_index)
                    value, dz = class_loss(y, p, t, keep, cols, n_out)
                    if LOSS_OUT:
                        tl.store(loss_ptr + rows, value.to(loss_ptr.dtype.element_ty), mask=row_mask)
                    if STATS:
                        tl.store(stats_ptr + 2 * block, tl.sum(value, axis=0))
                        tl.store(stats_ptr + 2 * block + 1, tl.sum(keep.to(ACC), axis=0))
            elif STORE_OUT:  # logits, no loss
                tl.store(out_ptr + out_offs, z.to(out_dtype), mask=out_mask)
        else:  # a module's backward: dz from the incoming gradient
            g = tl.load(g_ptr + rows[:, None] * stride_g_row + cols[None, :] * stride_g_col, mask=out_mask,
                        other=0.0).to(ACC)
            if GRAD_IN == "dlogits":
                dz = g * tl.load(scale_ptr + rows[:, None] * stride_s_row + cols[None, :] * stride_s_col,
                                 mask=out_mask, other=0.0).to(ACC)
            elif HEAD == "log_softmax":
                y = tl.load(y_ptr + out_offs, mask=out_mask, other=float("-inf")).to(ACC)
                dz = g - tl.exp(y) * tl.sum(g, axis=1)[:, None]
            else:
                dz = g
        if STORE_DZ:
            tl.store(dz_ptr + out_offs, dz.to(dz_ptr.dtype.element_ty), mask=out_mask)
        if BACKWARD:
            tl.debug_barrier()  # the activations this program stored (HSPLIT: the counter's acquire orders the rest)
            dz = dz.to(dtype)  # as stored for the weight-gradient launch: its products use these values
            lp = lp_ptr + block.to(tl.int64) * (n_out * n_last + n_out)
            if ROW_PARTIALS:
                dz = tl.where(row_mask[:, None], dz, 0.0)  # rows past B add nothing
                if HAS_BIAS[last]:
                    tl.store(lp + n_out * n_last + cols, tl.sum(dz.to(ACC), axis=0), mask=col_mask)
            for n0 in range(0, n_last, BLOCK_H):  # the last hidden layer: act'(dz w_L), dz still on chip
                hs = n0 + tl.arange(0, BLOCK_H)
                h_mask = hs < n_last
                hmask2 = row_mask[:, None] & h_mask[None, :]
                w = tl.load(ws[last] + cols[:, None] * w_strides[2 * last] + hs[None, :] * w_strides[2 * last + 1],
                            mask=col_mask[:, None] & h_mask[None, :], other=0.0)
                d = tl.dot(dz, w, input_precision=PRECISION, out_dtype=ACC)
                a = tl.load(acts[last - 1] + rows[:, None] * n_last + hs[None, :], mask=hmask2, other=0.0,
                            cache_modifier=".cg" if HSPLIT else "")  # in L2 (HSPLIT: stored by other programs)
                if ROW_PARTIALS:  # dW_L[:, slice] of the block's rows: dz_bᵀ a_b, while a is on chip
                    tl.store(lp + cols[:, None] * n_last + hs[None, :],
                             tl.dot(tl.trans(dz), a, input_precision=PRECISION, out_dtype=ACC),
                             mask=col_mask[:, None] & h_mask[None, :])
                tl.store(dpres[last - 1] + rows[:, None] * n_last + hs[None, :],
                         activation_grad(d, a, tl.constexpr(ACTIVATIONS[last - 1])).to(dtype), mask=hmask2)
            for j in tl.static_range(N_LAYERS - 2):  # earlier hidden layers, from the gradient stored just before
                h: tl.constexpr = N_LAYERS - 3 - j  # the hidden layer made now (0-based)
                if h >= LOWEST:
                    tl.debug_barrier()
                    for n0 in range(0, widths[h + 1], BLOCK_H):
                        hs = n0 + tl.arange(0, BLOCK_H)
                        h_mask = hs < widths[h + 1]
                        hmask2 = row_mask[:, None] & h_mask[None, :]
                        d = grad_slice(dpres[h + 1], widths[h + 2], ws[h + 1], w_strides[2 * h + 2],
                                       w_strides[2 * h + 3], rows, row_mask, hs, h_mask, widths[h + 2], ACC,
                                       BLOCK_M, BLOCK_H, BLOCK_K, PRECISION)
                        a = tl.load(acts[h] + rows[:, None] * widths[h + 1] + hs[None, :], mask=hmask2, other=0.0)
                        tl.store(dpres[h] + rows[:, None] * widths[h + 1] + hs[None, :],
                                 activation_grad(d, a, tl.constexpr(ACTIVATIONS[h])).to(dtype), mask=hmask2)


LARGE_BATCH = 16384  # rows from which the row kernel takes the tensor cores' 64- and 128-row tiles (TF32, 16-bit)
# and the train step's 128-row tiles (two layers) already from this many rows × hidden features, and at least
# STEP_LARGE_ROWS rows (rows_config)
STEP_LARGE_WORK = 1 << 19
STEP_LARGE_ROWS = 256
SPLIT_UNALIGNED_ROWS = 256  # up to here the train step's unaligned float32 hidden layers (the course's 100) split
SPLIT_ALIGNED_ROWS = 1024  # and its aligned ones of 65-128 features (the seed's 128): G = 2 fits 132 SMs up to 1056


def rows_config(n_rows: int, widths: tuple, dtype: torch.dtype, *, forward: bool, backward: bool,
                precision: str = "ieee", loss: str = "none") -> dict:
    """Launch configuration of :func:`rows_kernel` (block sizes, warps, stages), from ``python -m
    bench.compile_report`` (sm_80, sm_90): no spills at the seed shape, shared memory within bounds over the sweep.

    - forward only (a module's forward): 16 rows (32 for 16-bit dtypes past 4096 rows, half the weight re-reads;
      fp32 at 32 rows spills), K steps of 32 (16 for fp32 IEEE and fp64), hidden slices of up to 64 with a w_L
      tile of at most 4096 elements, 4 warps (8 past 256 outputs), 3 stages; from LARGE_BATCH rows,
      as the train step, 64-row tiles for TF32 (K 32) and 16-bit dtypes (K 64) up to 256 outputs, 8 warps, 2
      stages (no spills on sm_80 and sm_90 in any of the forward variants at 16384–65536 rows; 4 warps spill at
      256 outputs, 3 stages at 4096 → 1024 → 128 in 16-bit dtypes);
    - forward and backward (the train step): 16 rows, hidden slices of up to 128 (one at the seed shape but in fp32
      IEEE, below), K steps of 64 for 16-bit dtypes and TF32 and 32 for fp32 IEEE (fewer dependent steps for the
      8 row blocks of B = 128:
      49 steps of 16 became 13 and 25) — 16 in float32 for hidden widths that are not multiples of 16 and in
      fp32 IEEE past 128 outputs (a logits tile of 256 or more) —, 32 for float64 (16 spill 8 B at B = 1), 8
      warps (16 past 256 outputs: 4 warps spill in fp32 IEEE), 2 stages (1 for float64 with at most 32 inputs,
      where the first layer is one K step); in fp32 IEEE, for two layers, up to 16 outputs and a hidden layer of
      65–128 features, two slices of 64, K steps of 32, 3 stages, for the hidden split to share (G = 2: the
      16-row blocks' FMA term halves) — up to SPLIT_UNALIGNED_ROWS rows for an unaligned hidden layer (the
      course's regression at 64 rows: launch 1 9.8 → 6.4 µs, the step 12.2 → 8.8 predicted), up to
      SPLIT_ALIGNED_ROWS for an aligned one with an input of whole 16-wide tiles, at least 64 (the seed at 128
      rows: launch 1 8.5 → 5.6 µs, the step 11.4 → 8.5; at 1024 rows 14.1 → 11.2; past 1056 rows an H200's
      SMs take no second group and the second slice costs, 8.5 → 8.8 at 2048 rows; no spills over 208 variants
      with either ptxas, 1–1024 rows, 64–2048 inputs, relu and sigmoid, bias or not, NLL and MSE);
      from LARGE_BATCH rows — for the 128-row tiles below (two layers) from STEP_LARGE_WORK rows × hidden
      features too (and STEP_LARGE_ROWS rows: 4096 rows at hidden 128, 512 at 1024, 256 from 2048 on; in TF32
      from half that work as well, from twice STEP_LARGE_ROWS rows: 2048 rows at hidden 128, 1024 at 256, 512 at 512, the step
      16.4 → 13.7, 16.4 → 14.2 and 16.2 → 14.8 µs predicted, where bf16 loses, 10.4 → 10.8 and 10.1 → 11.0 at
      hidden 128 and 512; 256 rows at hidden 1024 lost in TF32, 16.2 → 16.7: ``python -m bench.model
      --batches … --hidden … --modes …``) — and for hidden widths that are multiples of 16, 64-row tiles for
      TF32 (K 32) and
      16-bit dtypes (K 64), 8 warps — a quarter of the weight re-reads from L2, and the tensor cores' larger
      instructions (fp32 IEEE spills at 32 and 64 rows: it keeps 16; the course's hidden 100 spills 8–836 B at
      64 rows, with MSE or sigmoid: it keeps 16 too) —, and 128-row tiles in 16-bit dtypes for two layers with an
      input width that is a multiple of 16 and at most 128 outputs (half the weights' re-reads again: at 65536
      rows, hidden 1024, bf16, launch 1 279.8 → 195.5 µs predicted; 202–255 registers, no spills on sm_80 and
      sm_90 with Triton 3.6's and 3.8's ptxas, relu and sigmoid; at 256 outputs, three layers or an unaligned hidden
      layer they spill 88–1300 B, with the course's 1000 inputs 184–404 B, 16 warps spill too) — and in TF32 for
      at most 32 outputs, with hidden slices of 64 (255 registers, no spills on sm_80 and sm_90 with either
      ptxas; slices of 128 spill 8–128 B, 64 outputs 12 B with Triton 3.6, 128 outputs 56–80 B; launch 1 at
      65536 rows, hidden 1024: 557.6 → 553.4 µs predicted, no gain: x is re-read once per slice, so halving the
      slices gives back what the taller tiles save on the weights — kept, as it compiles clean and runs half
      the waves; an earlier model that read x once predicted 413.7 → 245.1). Below 16384 rows the 16-row tiles
      re-read the weights every 16 rows, and the hidden split (G programs per row block) fills the SMs the fewer
      row blocks leave idle: at hidden 1024 the step is predicted 52.3 → 36.4 µs in TF32 and 30.3 → 20.6 in bf16
      at 1024 rows, 197.3 → 133.0 and 100.7 → 63.5 at 4096, 248.9 → 118.5 and 127.1 → 56.1 at 8192 (which
      the 16-row tiles made slower than 16384 rows); at hidden 128, 28.5 → 20.5 and 16.5 → 13.7 at 4096 rows.
      Below the threshold they lose (hidden 128 at 2048 rows in bf16: 10.4 → 10.8; hidden 512 at 512 rows:
      10.1 → 10.5; 128 rows at hidden 4096 in TF32: 28.4 → 34.1);
    - backward only (a module's backward): 16 rows, slices as the forward's, 8 warps, 2 stages.

    ``loss="mse"`` (the squared error's target tile beside the logits) changes warps, K steps, stages only, never the
    tiles (``BLOCK_M``, ``BLOCK_H``: the row blocks, the hidden split and the row partials do not depend on the
    loss): the train step's 16-row tiles take 4 warps for hidden slices of at most 32 (8 spilled 8–28 B
    at hidden 16 in fp32/TF32/bf16 and at 128 outputs in 16-bit dtypes on sm_80) and K steps of 32 for a wide
    logits tile (16 warps at 1024 outputs in 16-bit dtypes spilled 4–28 B), and K steps of 16 in fp32 IEEE past
    two layers (32 spilled 8–12 B at 784 → 128 → 128 → 10 on sm_90): no spills over the sweep of
    ``step_rows_mse`` (``bench.gpu_compile.sweep_cases``), its seed and course shapes and hidden 1024 with Triton
    3.6's and 3.8's ptxas. A module forward with the MSE head keeps the class head's tiles, with 8 warps in fp32
    IEEE, 2 stages in TF32 and float64, and K steps of 16 in TF32's large-batch tiles (see the code): no spills
    over the sweep of ``forward_mse``, its seed and course shapes with either ptxas.
    """
    block_out = dot_block(widths[-1], MAX_OUT)
    hidden = max(widths[1:-1])
    wide = block_out > 256
    half = dtype.itemsize == 2
    mse = loss == "mse"  # the squared error's target tile beside the logits (docstring)
    aligned = all(n % 16 == 0 for n in widths[1:-1])  # hidden widths of whole 16-wide tiles
    # 128-row tiles (the train step at two layers): from rows × hidden features as well as from LARGE_BATCH rows
    tall = len(widths) == 3 and widths[0] % 16 == 0 and block_out <= (128 if half else 32)
    work = n_rows * widths[-2]  # TF32 from half the work too, from 2 · STEP_LARGE_ROWS rows (docstring)
    enough = n_rows >= LARGE_BATCH or (backward and tall and (
        n_rows >= STEP_LARGE_ROWS and work >= STEP_LARGE_WORK
        or not half and n_rows >= 2 * STEP_LARGE_ROWS and 2 * work >= STEP_LARGE_WORK))
    large = forward and enough and (half or precision == "tf32") and not wide

    def large_tiles(block_h, block_m=64):  # from LARGE_BATCH rows, with a forward: the tensor cores' tiles
        return dict(BLOCK_M=block_m, BLOCK_K=dot_block(widths[0], 64 if half else 32), BLOCK_H=block_h,
                    BLOCK_OUT=block_out, num_warps=8, num_stages=2)

    if forward and backward:
        block_h = dot_block(hidden, max(16, min(128, 4096 // block_out)))
        if large and aligned:  # 128 rows for two layers, an aligned input and at most 128 outputs (TF32: 32, and
            # hidden slices of 64)
            return large_tiles(min(block_h, 64) if tall and not half else block_h, 128 if tall else 64)
        # (aligned: an input of whole 16-wide tiles, at least 64 — 20 or 1000 inputs spilled 4 B on sm_90 and 16
        # inputs 4-12 B on sm_80 and sm_90 with Triton 3.6)
        split_rows = (SPLIT_UNALIGNED_ROWS if not aligned else
                      SPLIT_ALIGNED_ROWS if widths[0] % 16 == 0 and widths[0] >= 64 else 0)
        if (dtype == torch.float32 and precision == "ieee" and len(widths) == 3 and 64 < hidden <= 128
                and n_rows <= split_rows and block_out <= 16):
            # fp32 IEEE at small B, 65-128 hidden features (the seed's 128, the course's regression 1000 -> 100
            # -> 10): two hidden slices of 64 for the hidden split to share (G = 2: twice the SMs), K steps of
            # 32, 3 stages (2 spilled 12 B on sm_90 with the course's 100; TF32 spilled 12-20 B at some batch
            # sizes with either: it keeps the slice of 128)
            return dict(BLOCK_M=16, BLOCK_K=dot_block(widths[0], 32), BLOCK_H=64, BLOCK_OUT=block_out,
                        num_warps=8, num_stages=3)
        if dtype == torch.float64:  # K steps of 32 (16 spill 8 B at B = 1, and a few bytes in a chain of layers)
            block_k = 32
        elif not half and (not aligned or precision != "tf32" and (block_out >= 256 or mse and len(widths) > 3)):
            block_k = 16  # unaligned fp32 tiles (the course's 100): 32 and 64 spill 4-12 B on sm_90; fp32 IEEE
            # with a logits tile of 256 or more: 32 spills 8 B at 256 outputs on sm_90 with Triton 3.6; fp32 IEEE
            # with MSE past two layers: 32 spills 8-12 B at 784 -> 128 -> 128 -> 10 on sm_90
        else:  # fp32 IEEE at 64 spills 8 B on sm_80; TF32 at 32 spills 12 B there with Triton 3.6's ptxas; MSE with
            # a wide logits tile: 64 spills 4-28 B at 1024 outputs in 16-bit dtypes
            block_k = 64 if (half or precision == "tf32") and not (mse and wide) else 32
        # MSE with hidden slices of at most 32: 8 warps spill 8-28 B (hidden 16, 128 outputs in 16-bit on sm_80)
        num_warps = 16 if wide else 4 if mse and block_h <= 32 else 8
        # float64 with inputs of at most 32 (the first layer in one K step): 1 stage (2 spilled 12-16 B at
        # 20 -> 13 -> 8 -> 3 with sigmoid on sm_90 with Triton 3.6)
        stages = 1 if dtype == torch.float64 and widths[0] <= 32 else 2
        return dict(BLOCK_M=16, BLOCK_K=dot_block(widths[0], block_k), BLOCK_H=block_h, BLOCK_OUT=block_out,
                    num_warps=num_warps, num_stages=stages)
    # hidden widths that are not multiples of 16 (the course's 100, 13, 8): slices of 32, as 64-wide ones take
    # 255 registers and spill in fp32 IEEE (unaligned weight tiles)
    block_h = dot_block(hidden, max(16, min(64 if aligned else 32, 4096 // block_out)))
    if large:  # TF32 with the MSE head: K steps of 16 (32 spilled 4 B at 65536 rows on sm_80 with Triton 3.6)
        return dict(large_tiles(block_h), **({"BLOCK_K": dot_block(widths[0], 16)} if mse and not half else {}))
    if forward:
        block_m = 32 if n_rows > 4096 and block_out <= 128 and half else 16
        # fp32 IEEE (FMA-bound: the step size costs little): K steps of 16 — at 32, 4-8 B spills at 10 of the 192
        # fp32 forward variants of the report with Triton 3.8, 9 with 3.6; at 16, 0 and 6 (2 stages: 13 and 12)
        ieee = dtype.itemsize >= 4 and precision != "tf32"
        # 3 stages (float64 at 2 spilled 8 B in forward_eval without bias on sm_90 with Triton 3.6); with the MSE
        # head 2 in TF32 and float64 (3 spilled 8 B in TF32 at 4097 rows on sm_90 with Triton 3.8, 4 B at 1 row on
        # sm_80 with 3.6, and 8-16 B in float64 at 1000 -> 100 with 3.8), and 8 warps in fp32 IEEE (at 4 it
        # spilled 4-8 B at 1, 100 and 4097 rows on sm_90 with 3.6; 2 stages 8 B at eight shapes with 3.8);
        # 16-bit dtypes keep the class head's (clean with both)
        fp32_ieee = ieee and dtype == torch.float32
        stages = 2 if mse and (precision == "tf32" or dtype == torch.float64) else 3
        warps = 8 if wide or mse and fp32_ieee else 4
        return dict(BLOCK_M=block_m, BLOCK_K=dot_block(widths[0], 16 if ieee else 32), BLOCK_H=block_h,
                    BLOCK_OUT=block_out, num_warps=warps, num_stages=stages)
    return dict(BLOCK_M=16, BLOCK_K=dot_block(hidden, 32), BLOCK_H=block_h, BLOCK_OUT=block_out,
                num_warps=8, num_stages=2)  # 4 warps: 16 B spills in TF32 with sigmoid on sm_90 with Triton 3.6


def row_partials_pay(n_rows: int, widths: tuple, dtype: torch.dtype, precision: str = "ieee") -> bool:
    """Whether the train step's row pass makes the last layer's weight gradient, per row block, while the last
    hidden layer's block is on chip (``rows(row_partials=)``), for the weight-gradient launch to sum: with the
    large-batch tiles of 64 or more rows, where the partials' traffic (written and read: ``8·n_L`` bytes per
    hidden feature and row block) is below that of the activations and dz the weight-gradient launch no longer
    reads (``BLOCK_M·s`` per hidden feature and row block, from HBM past the L2's size) — bf16 at 65536 rows,
    hidden 1024, 10 outputs: 21 MB of partials for 134 MB of activations; launch 2's last-layer tiles sum R
    partials instead of reducing over B rows (``python -m bench.model``: launch 2 194.0 → 181.6 µs there, 51.0 →
    47.9 at 16384 rows). Those tiles are only taken for hidden widths that are multiples of 16 (:func:`rows_config`;
    the course's 100 spills 4–300 B with the partials' product)."""
    cfg = rows_config(n_rows, widths, dtype, forward=True, backward=True, precision=precision)
    return len(widths) >= 3 and cfg["BLOCK_M"] >= 64 and 8 * widths[-1] < cfg["BLOCK_M"] * dtype.itemsize


def row_partials_buffer(n_rows: int, widths: tuple, dtype: torch.dtype, precision: str,
                        device) -> torch.Tensor | None:
    """The train step's ``rows(row_partials=)`` buffer where :func:`row_partials_pay`, else None: R row blocks
    of ``n_L·n_{L−1} + n_L`` accumulator elements."""
    if n_rows == 0 or not row_partials_pay(n_rows, widths, dtype, precision):
        return None
    cfg = rows_config(n_rows, widths, dtype, forward=True, backward=True, precision=precision)
    return torch.empty((triton.cdiv(n_rows, cfg["BLOCK_M"]), widths[-1] * (widths[-2] + 1)), device=device,
                       dtype=torch.promote_types(dtype, torch.float32))


def n_row_blocks(n_rows: int, widths: tuple, dtype: torch.dtype, *, forward=True, backward=True,
                 device: torch.device | None = None) -> int:
    """R, the number of programs (row blocks) of a launch on ``device`` (its matmul precision picks the tiles):
    the rows of ``stats``."""
    precision = dot_precision(dtype, device) if device is not None else "ieee"
    cfg = rows_config(n_rows, widths, dtype, forward=forward, backward=backward, precision=precision)
    return triton.cdiv(n_rows, cfg["BLOCK_M"])


def hidden_split(n_blocks: int, n_slices: int, device: torch.device, sm_count: int | None = None,
                 tensor_cores: bool = True) -> int:
    """G, the programs that share each row block's last hidden layer (``n_slices`` slices of BLOCK_H) in a launch
    with a forward (two layers): when the ``n_blocks`` row blocks leave SMs idle (small B), enough groups to give
    every SM a program in one wave (a second wave of a few programs would cost a whole chain), at most one per
    slice. With ``tensor_cores`` (TF32, 16-bit dtypes) only while the blocks occupy at most a quarter of the SMs:
    past that the launch is bound by L2 (each block streams the whole of w_1) and the split's extra traffic (x
    read by each of the G programs, the partials) would cost more than its shorter chain brings (B = 1024, hidden
    1024, TF32, in 16-row tiles — the train step takes 128-row ones there now —: 26.5 → 26.9 µs predicted at
    G = 2; bf16 would gain, 16.4 → 14.5); FMA-bound fp32 IEEE splits
    while the blocks leave half of the SMs idle. Each of a block's G programs makes ``⌈n_slices / G⌉`` slices
    and their logit partials; the last to arrive sums the partials in group order
    (:func:`pyfused.kernels.gemm.split_reduce`) and runs the head, the loss and the backward rows for all of the
    layer — the dependent K-steps of the block's chain drop from ``n_slices·(⌈n_0/BLOCK_K⌉ + 2)`` to about
    ``⌈n_slices/G⌉·(⌈n_0/BLOCK_K⌉ + 1) + G + n_slices`` (``python -m bench.model``). ``sm_count`` stands for a
    GPU of that many SMs; without it, 1 off CUDA (the interpreter runs programs one after another: tests pass
    ``split``)."""
    sm_count = sms(device, sm_count)
    if sm_count is None or n_slices < 2 or n_blocks * (4 if tensor_cores else 2) > sm_count:
        return 1
    return min(n_slices, sm_count // n_blocks)  # one wave: a second one for a few programs costs a whole chain


def _groups(split, n_blocks, widths, x, cfg, forward, backward, precision, sm_count):
    """(G, hidden features per group) of a launch: ``split`` when given, else :func:`hidden_split`'s choice where
    the split applies — a two-layer forward; not float64 (24 B spills on sm_80 at 128 outputs; a correctness
    dtype), not past 256 outputs (partials of 16 × 1024, more spills), not a forward only (a module's) in fp32
    IEEE (4–20 B spills split). Groups are whole slices, and each makes at least one."""
    n_slices = triton.cdiv(widths[-2], cfg["BLOCK_H"])
    groups = 1
    if forward and len(widths) == 3 and n_slices > 1:
        tensor_cores = precision == "tf32" or x.dtype.itemsize == 2
        if split is not None:
            groups = split
        elif x.dtype != torch.float64 and cfg["BLOCK_OUT"] <= 256 and (backward or tensor_cores):
            groups = hidden_split(n_blocks, n_slices, x.device, sm_count, tensor_cores=tensor_cores)
    if groups <= 1:
        return 1, max(n_slices, 1) * cfg["BLOCK_H"]
    group_cols = triton.cdiv(n_slices, groups) * cfg["BLOCK_H"]
    return triton.cdiv(widths[-2], group_cols), group_cols


def _pairs(tensors, stand_in):
    return tuple(stand_in if t is None else t for t in tensors)


def rows(x, weights, biases, activations, *, head="log_softmax", loss="none", target=None, ignore_index=-100,
         acts, dpres=None, out=None, loss_out=None, stats=None, dz=None, forward=True, store_last=True,
         grad_in=None, g=None, y=None, scale=None, lowest=0, split=None, sm_count=None,
         config=None, row_partials=None):
    """Launch :func:`rows_kernel` on validated 2-D ``x`` (B ≥ 1 rows) into the caller's buffers.

    ``weights``/``biases``: L tensors each (biases None where absent); ``activations``: L − 1 names; ``acts``: L − 1
    (B, n_i) buffers of x's dtype (the last one is written only with ``store_last``); ``dpres``: L − 1 such buffers
    (BACKWARD when given); ``out``: (B, n_L) for the head's output; ``loss_out``, ``stats``: loss values and
    per-block sums; ``dz``: (B, n_L) for the logit gradient. Without ``forward``: ``grad_in`` "dlogits" (``g`` the
    saved dz, ``scale`` a tensor broadcastable to it) or "dy" (``g``; ``y`` the saved log-probabilities for a
    log_softmax head). ``lowest``: the lowest hidden layer whose gradient is needed. ``split``: G, the programs
    per row block that share the hidden layer of a two-layer forward (:func:`hidden_split`, for ``sm_count`` SMs
    when given, when None); ``config``: :func:`rows_config`'s dict to use instead (tests: other tiles at small
    sizes); extra memory with G > 1: ``R·G·BLOCK_M·(BLOCK_OUT + 1)`` accumulator elements of
    logit partials and R int32 counters (cached, left zero by every launch). ``row_partials`` (with ``dpres``): an
    (R, n_L·n_{L−1} + n_L) accumulator-dtype buffer for each row block's share of the last layer's gradient,
    ``dz_bᵀ a_{L−1,b}`` then ``Σ_rows dz_b`` (with a bias), made while ``a_{L−1}`` is on chip
    (:func:`row_partials_pay`), for :func:`pyfused.kernels.grads.grads` to sum.
    """
    n_rows = x.shape[0]
    widths = (x.shape[1], *(w.shape[0] for w in weights))
    if widths[-1] > max_out(x.dtype):
        raise ValueError(f"the Triton kernels take out_features <= {max_out(x.dtype)} in {x.dtype}, got "
                         f"{widths[-1]}; use PYFUSED_BACKEND=auto or torch")
    backward = dpres is not None
    precision = dot_precision(x.dtype, x.device)
    cfg = config or rows_config(n_rows, widths, x.dtype, forward=forward, backward=backward, precision=precision,
                                loss=loss)
    any_buffer = x
    n_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
    if row_partials is not None and (not backward or tuple(row_partials.shape) != (
            n_blocks, widths[-1] * widths[-2] + widths[-1])):
        raise ValueError(f"row_partials: expected ({n_blocks}, {widths[-1] * widths[-2] + widths[-1]}) with dpres, "
                         f"got {tuple(row_partials.shape)}{'' if backward else ' without dpres'}")
    groups, group_cols = _groups(split, n_blocks, widths, x, cfg, forward, backward, precision, sm_count)
    parts = counters = any_buffer
    if groups > 1 and config is None and cfg["BLOCK_M"] >= 128 and x.dtype.itemsize == 2:
        # the split's 128-row 16-bit tiles: K steps of 32 (64 spilled 4-8 B at 1024 x 784 -> 1024 -> 10, sigmoid,
        # no bias, on sm_80 with Triton 3.6's ptxas)
        cfg = dict(cfg, BLOCK_K=dot_block(widths[0], 32))
    if groups > 1:
        parts = torch.empty(n_blocks * groups * cfg["BLOCK_M"] * (cfg["BLOCK_OUT"] + 1), device=x.device,
                            dtype=torch.promote_types(x.dtype, torch.float32))
        counters = arrival_counters("rows", x.device, n_blocks)
    w_strides = tuple(s for w in weights for s in w.stride())
    scale_strides = (0, 0) if scale is None else (*scale.stride(), 0, 0)[:2]  # 0-dim, (B,) per row or (B, n_L)
    if target is not None and loss == "mse":
        t_strides = target.stride()
    elif target is not None:
        t_strides = (target.stride(0), 0)
    else:
        t_strides = (0, 0)
    launch(rows_kernel, (n_blocks * groups,), x.device,
           x, x.stride(0), x.stride(1),
           tuple(weights), w_strides, _pairs([None if b is None else b.contiguous() for b in biases], any_buffer),
           _pairs(acts, any_buffer), _pairs(dpres or [None] * len(acts), any_buffer), widths,
           any_buffer if out is None else out,
           any_buffer if target is None else target, *t_strides, ignore_index,
           any_buffer if loss_out is None else loss_out, any_buffer if stats is None else stats,
           any_buffer if g is None else g, *(g.stride() if g is not None else (0, 0)),
           any_buffer if y is None else y,
           any_buffer if scale is None else scale, *scale_strides,
           any_buffer if dz is None else dz,
           parts, counters, any_buffer if row_partials is None else row_partials, groups, group_cols,
           n_rows,
           N_LAYERS=len(weights), HAS_BIAS=tuple(b is not None for b in biases), ACTIVATIONS=tuple(activations),
           HEAD=head, LOSS=loss, FORWARD=forward, STORE_LAST=store_last, STORE_OUT=out is not None,
           LOSS_OUT=loss_out is not None, STATS=stats is not None, STORE_DZ=dz is not None, BACKWARD=backward,
           GRAD_IN=grad_in or "none", LOWEST=lowest, RAGGED_LAST=widths[-2] % cfg["BLOCK_H"] != 0,
           HSPLIT=groups > 1, ROW_PARTIALS=row_partials is not None,
           ACC=acc_dtype(x.dtype),
           PRECISION=precision, **cfg)
