"""The whole SGD training step of the fused MLP in two launches: forward, loss and row gradients; then the
weight gradients, with the momentum-SGD update applied in their epilogue.

Sizes: B rows, ``in`` → ``hidden`` → ``out``; s bytes per element (4 for fp32); P = hidden·in + out·hidden
(+ hidden + out with biases) parameters; R = ⌈B / BLOCK_M⌉ row blocks.

Launch 1, :func:`step_rows_kernel`, R programs of BLOCK_M rows. Per hidden slice of BLOCK_H (one slice at the
seed shape): ``h = act(x @ w1ᵀ + b1)`` (relu or sigmoid) accumulated over ``in`` in BLOCK_K steps, stored, and multiplied at
once into the logits ``z += h @ w2ᵀ``, which never leave the chip. Then log_softmax, the nll of each row, the
*unscaled* logit gradient ``dz = softmax − onehot`` (zero rows for ignored targets, NaN rows for targets out
of range) and, per hidden slice, ``dh = act'(dz @ w2)`` (from h). Each program writes the nll sum and the number
of counted rows of its block to ``stats[r]``: the mean's divisor costs no launch. Reads B·in·s of x per hidden
slice, w1 and w2 once per program (from L2 after the first), 8·B of targets, its own h again (L1/L2);
writes h and dh (2·B·hidden·s), dz (B·out·s) and stats (8·R bytes).

Launch 2, :func:`step_grads_kernel`, one grouped launch: programs over the BLOCK_A × BLOCK_N tiles of
``dW1 = dhᵀ @ x`` (hidden × in; the tiles of the first column also make ``db1 = Σ_rows dh``), over the
BLOCK_O × BLOCK_N tiles of ``dW2 = dzᵀ @ h`` (out × hidden, with ``db2``), and one program that turns
``stats`` into the mean loss. Each tile is reduced over the B rows by one program in a fixed order (no
atomics: bit-identical from run to run), and every program sums the R row counts itself, in a fixed order, for
the mean's factor ``1 / max(count, 1)``: the gradient of a tile is final in its registers, and the SGD update
of that tile (:func:`sgd_update`) is applied there and then. Reads x once per row of dW1 tiles (once when
BLOCK_A ≥ hidden, as at the seed shape), dh, dz and h once per column of tiles (L2 after the first), 8·R bytes
of stats per program; reads and writes the parameters (2·P·s) and momentum buffers (2·P·s), and writes the
gradients only when they are kept (P·s). Nothing is recompiled per hyper-parameter value: they are read from a
small device tensor (which a replayed CUDA graph also reads).

At the seed shape (B = 128, 784 → 128 → 10, no bias, fp32, momentum) a step moves about 3.1 MB: x twice
(0.8 MB), w1 once in launch 1 (0.4 MB), h, dh, dz written and read (0.3 MB), parameters and buffers read and
written (1.6 MB).

x is read twice, once per launch (the second time from L2 at the seed shape: 401 KB of x against 50 MB of L2 on
an H100). Reading it once would mean keeping each row block of x on chip until its dh is known, and so
per-row-block partial sums of dW1, reduced afterwards: 2·R·hidden·in·4 bytes written and read back instead of
B·in·s, 2·hidden / BLOCK_M = 16 times more at the seed shape, for no fewer launches.

Extra memory: 2·B·hidden·s (h, dh) + B·out·s (dz) + 8·R bytes (stats), plus P·s for kept gradients; the kernels
allocate nothing. Gradients go to caller-given tensors (views of one flat buffer ``dw1 | db1 | dw2 | db2`` in
:class:`pyfused.train_step.FusedTrainStep`).

Accumulation and all-reduce (:func:`step_accumulate`, :func:`step_update`): launch 2 without the update writes
(or adds) each tile's gradient, divided by k·count, into that flat buffer (P·4 bytes written, and read when
adding) — with ``count`` from a (2,) ``totals`` tensor when the ranks all-reduced it —; after the last batch of a
group (and the caller's all-reduce of the buffer), :func:`step_update_kernel` applies the same
:func:`sgd_update` elementwise: reads the gradient, parameters and buffers, writes parameters and buffers
(P·(4 + 4·s) bytes), 1024 elements per program.
"""
import torch
import triton
import triton.language as tl

from .activation import activate, activation_grad
from .gemm import tile_product
from .launch import acc_dtype, dot_block, dot_precision, launch
from .mlp_forward import MAX_OUT

# one hyper-parameter row per parameter: lr, momentum, dampening, weight_decay, nesterov, sign, first, (unused)
HP_WIDTH = tl.constexpr(8)


@triton.jit
def sgd_update(p_ptr, buf_ptr, grad_ptr, offs, mask, g, hp_ptr, HAS_BUF: tl.constexpr, KEEP_GRAD: tl.constexpr):
    """torch.optim.SGD on the elements ``offs`` of one parameter, given their gradient ``g`` (fp32 or fp64).

    With ``hp = hp_ptr[0:7] = (lr, momentum, dampening, weight_decay, nesterov, sign, first)``:
    ``d = sign·g + weight_decay·p`` (sign = −1 maximises); with a momentum buffer ``buf = d`` on the first step
    (``first`` ≠ 0) else ``buf = momentum·buf + (1 − dampening)·d``, then ``d = d + momentum·buf`` (nesterov) or
    ``d = buf``; ``p = p − lr·d``. Writes ``g`` to ``grad_ptr`` (KEEP_GRAD), p and buf in their dtype."""
    if KEEP_GRAD:
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
    lr = tl.load(hp_ptr)
    weight_decay = tl.load(hp_ptr + 3)
    sign = tl.load(hp_ptr + 5)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(g.dtype)
    d = g * sign + weight_decay * p
    if HAS_BUF:
        momentum = tl.load(hp_ptr + 1)
        dampening = tl.load(hp_ptr + 2)
        nesterov = tl.load(hp_ptr + 4)
        first = tl.load(hp_ptr + 6)
        buf = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        buf = tl.where(first != 0, d, momentum * buf + (1.0 - dampening) * d)
        tl.store(buf_ptr + offs, buf.to(buf_ptr.dtype.element_ty), mask=mask)
        d = tl.where(nesterov != 0, d + momentum * buf, buf)
    tl.store(p_ptr + offs, (p - lr * d).to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def accumulate(ptr, offs, mask, g, add):
    """``ptr[offs] = g`` (``add`` = 0, the first batch of a group) or ``ptr[offs] += g``."""
    if add != 0:
        g += tl.load(ptr + offs, mask=mask, other=0.0).to(g.dtype)
    tl.store(ptr + offs, g.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def step_rows_kernel(
    x_ptr,  # (B, in)
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # w1 (hidden, in), b1 (hidden,), w2 (out, hidden), b2 (out,), contiguous
    target_ptr,  # (B,) integer class indices
    h_ptr, dz_ptr, dh_ptr,  # out: h (B, hidden), dz (B, out), dh (B, hidden), contiguous, x's dtype
    stats_ptr,  # out: (R, 2) per row block: Σ nll of its rows, number of its counted rows (ACC dtype)
    n_rows, n_in, n_hidden, n_out, ignore_index,
    stride_x_row, stride_x_col, stride_target,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_OUT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Forward, nll, dz = softmax − onehot and dh = act'(dz @ w2) for BLOCK_M rows (launch 1)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    cols = tl.arange(0, BLOCK_OUT)
    col_mask = cols < n_out
    dtype = x_ptr.dtype.element_ty
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
            w1t = tl.load(w1_ptr + hs[None, :] * n_in + ks[:, None], mask=k_mask[:, None] & h_mask[None, :], other=0.0)
            acc = tl.dot(x, w1t, acc, input_precision=PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            acc += tl.load(b1_ptr + hs, mask=h_mask, other=0.0).to(ACC)[None, :]
        h = activate(acc, ACTIVATION).to(dtype)
        tl.store(h_ptr + rows[:, None] * n_hidden + hs[None, :], h, mask=row_mask[:, None] & h_mask[None, :])
        w2t = tl.load(w2_ptr + cols[None, :] * n_hidden + hs[:, None], mask=h_mask[:, None] & col_mask[None, :],
                      other=0.0)
        z = tl.dot(h, w2t, z, input_precision=PRECISION, out_dtype=ACC)
    if HAS_BIAS:
        z += tl.load(b2_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    z = tl.where(col_mask[None, :], z, float("-inf"))
    shifted = z - tl.max(z, axis=1)[:, None]
    e = tl.exp(shifted)
    denom = tl.sum(e, axis=1)
    # padding rows are not counted: other=ignore_index would wrap in a small target dtype (uint8: 156)
    t = tl.load(target_ptr + rows * stride_target, mask=row_mask, other=0).to(tl.int64)
    keep = row_mask & (t != ignore_index)
    in_range = (t >= 0) & (t < n_out)
    onehot = cols[None, :] == t[:, None]
    picked = tl.sum(tl.where(onehot, shifted, 0.0), axis=1) - tl.log(denom)
    nll = tl.where(keep, tl.where(in_range, -picked, float("nan")), 0.0)
    tl.store(stats_ptr + 2 * pid, tl.sum(nll, axis=0))
    tl.store(stats_ptr + 2 * pid + 1, tl.sum(keep.to(ACC), axis=0))
    dz = e / denom[:, None] - onehot.to(ACC)
    dz = tl.where(keep[:, None], tl.where(in_range[:, None], dz, float("nan")), 0.0).to(dtype)
    tl.store(dz_ptr + rows[:, None] * n_out + cols[None, :], dz, mask=row_mask[:, None] & col_mask[None, :])
    tl.debug_barrier()  # h of this block was stored by other threads of the program
    for h0 in range(0, n_hidden, BLOCK_H):
        hs = h0 + tl.arange(0, BLOCK_H)
        h_mask = hs < n_hidden
        hmask2 = row_mask[:, None] & h_mask[None, :]
        w2 = tl.load(w2_ptr + cols[:, None] * n_hidden + hs[None, :], mask=col_mask[:, None] & h_mask[None, :],
                     other=0.0)
        dh = tl.dot(dz, w2, input_precision=PRECISION, out_dtype=ACC)
        h = tl.load(h_ptr + rows[:, None] * n_hidden + hs[None, :], mask=hmask2, other=0.0)
        tl.store(dh_ptr + rows[:, None] * n_hidden + hs[None, :], activation_grad(dh, h, ACTIVATION).to(dtype),
                 mask=hmask2)


@triton.jit
def _grad_tile_update(
    a_ptr, stride_a_m, stride_a_k,  # A (M, K) = dhᵀ or dzᵀ, by strides
    b_ptr, stride_b_k, stride_b_n,  # B (K, N) = x or h
    M, N, K, tile, scale, add,
    w_ptr, wbuf_ptr, wgrad_ptr, whp_ptr,  # the (M, N) contiguous weight, its momentum buffer, gradient, hp row
    bias_ptr, bbuf_ptr, bgrad_ptr, bhp_ptr,  # the (M,) bias, its buffer, gradient, hp row (HAS_BIAS)
    UPDATE: tl.constexpr, HAS_BIAS: tl.constexpr, WBUF: tl.constexpr, BBUF: tl.constexpr,
    KEEP_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """Gradient tile ``scale · (A @ B)`` reduced over K in a fixed order, then SGD on that tile of the weight
    (UPDATE) or the tile stored / added (``add``) into the gradient; the tiles of the first column also make
    ``scale · Σ_k A[m, k]`` for the bias."""
    acc, row_sum, rm, rn, pid_n = tile_product(a_ptr, stride_a_m, stride_a_k, b_ptr, stride_b_k, stride_b_n,
                                               M, N, K, tile, HAS_BIAS, ACC, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    m_mask = rm < M
    n_mask = rn < N
    offs, mask = rm[:, None] * N + rn[None, :], m_mask[:, None] & n_mask[None, :]
    if UPDATE:
        sgd_update(w_ptr, wbuf_ptr, wgrad_ptr, offs, mask, acc * scale, whp_ptr, WBUF, KEEP_GRAD)
    else:
        accumulate(wgrad_ptr, offs, mask, acc * scale, add)
    if HAS_BIAS:
        if pid_n == 0:
            if UPDATE:
                sgd_update(bias_ptr, bbuf_ptr, bgrad_ptr, rm, m_mask, row_sum * scale, bhp_ptr, BBUF, KEEP_GRAD)
            else:
                accumulate(bgrad_ptr, rm, m_mask, row_sum * scale, add)


@triton.jit
def step_grads_kernel(
    x_ptr, h_ptr, dz_ptr, dh_ptr, stats_ptr,  # x (B, in); h, dh (B, hidden), dz (B, out) contiguous; stats (R, 2)
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # parameters, contiguous, updated in place
    bw1_ptr, bb1_ptr, bw2_ptr, bb2_ptr,  # their momentum buffers, updated in place (those with *BUF*)
    gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr,  # out: their gradients (KEEP_GRAD, or not UPDATE)
    hp_ptr,  # (4, HP_WIDTH) hyper-parameter rows of w1, b1, w2, b2 (see sgd_update)
    totals_ptr,  # (2,) Σ nll and count over every rank (GLOBAL), instead of the local stats
    loss_ptr,  # out: 0-dim mean loss
    k, add,  # the gradients are divided by k too (1 with UPDATE); without UPDATE, whether to add to them
    n_rows, n_in, n_hidden, n_out, n_blocks,
    stride_x_row, stride_x_col,
    tiles_w1,  # program ids [0, tiles_w1) make dW1 tiles, the next ones dW2 tiles, the last one the loss
    tiles_w2,
    UPDATE: tl.constexpr, GLOBAL: tl.constexpr,
    HAS_BIAS: tl.constexpr, BUF_W1: tl.constexpr, BUF_B1: tl.constexpr, BUF_W2: tl.constexpr, BUF_B2: tl.constexpr,
    KEEP_GRAD: tl.constexpr, ACC: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """Launch 2: one tile of dW1 = dhᵀx (+ db1) or dW2 = dzᵀh (+ db2), divided by ``k · count``, and its SGD
    update (UPDATE) or its accumulation into the gradients; or the mean loss Σ nll / count."""
    pid = tl.program_id(0)
    if GLOBAL:
        nll_total = tl.load(totals_ptr).to(ACC)
        count = tl.load(totals_ptr + 1).to(ACC)
    else:
        nll_sum = tl.zeros((BLOCK_R,), dtype=ACC)
        counts = tl.zeros((BLOCK_R,), dtype=ACC)
        for r0 in range(0, n_blocks, BLOCK_R):  # a fixed order, the same in every program
            r = r0 + tl.arange(0, BLOCK_R)
            nll_sum += tl.load(stats_ptr + 2 * r, mask=r < n_blocks, other=0.0)
            counts += tl.load(stats_ptr + 2 * r + 1, mask=r < n_blocks, other=0.0)
        nll_total = tl.sum(nll_sum, axis=0)
        count = tl.sum(counts, axis=0)
    if pid < tiles_w1 + tiles_w2:
        scale = 1.0 / (tl.maximum(count, 1.0) * k)
        if pid < tiles_w1:
            _grad_tile_update(dh_ptr, 1, n_hidden, x_ptr, stride_x_row, stride_x_col, n_hidden, n_in, n_rows, pid,
                              scale, add, w1_ptr, bw1_ptr, gw1_ptr, hp_ptr, b1_ptr, bb1_ptr, gb1_ptr,
                              hp_ptr + HP_WIDTH, UPDATE, HAS_BIAS, BUF_W1, BUF_B1, KEEP_GRAD, ACC,
                              BLOCK_A, BLOCK_N, BLOCK_B, PRECISION)
        else:
            _grad_tile_update(dz_ptr, 1, n_out, h_ptr, n_hidden, 1, n_out, n_hidden, n_rows, pid - tiles_w1, scale,
                              add, w2_ptr, bw2_ptr, gw2_ptr, hp_ptr + 2 * HP_WIDTH, b2_ptr, bb2_ptr, gb2_ptr,
                              hp_ptr + 3 * HP_WIDTH, UPDATE, HAS_BIAS, BUF_W2, BUF_B2, KEEP_GRAD, ACC,
                              BLOCK_O, BLOCK_N, BLOCK_B, PRECISION)
    else:
        tl.store(loss_ptr, (nll_total / count).to(loss_ptr.dtype.element_ty))


@triton.jit
def _update_block(p_ptr, buf_ptr, src_ptr, grad_ptr, hp_ptr, n, block, num, den,
                  HAS_BUF: tl.constexpr, KEEP_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    """SGD on elements [block·BLOCK, (block + 1)·BLOCK) of one parameter, from its gradient ``src · num / den``."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(src_ptr + offs, mask=mask, other=0.0)
    if num != den:
        g = (g * num / den).to(g.dtype)
    sgd_update(p_ptr, buf_ptr, grad_ptr, offs, mask, g, hp_ptr, HAS_BUF, KEEP_GRAD)


@triton.jit
def step_update_kernel(
    w1_ptr, b1_ptr, w2_ptr, b2_ptr,  # parameters, contiguous, updated in place
    bw1_ptr, bb1_ptr, bw2_ptr, bb2_ptr,  # their momentum buffers (those with *BUF*)
    sw1_ptr, sb1_ptr, sw2_ptr, sb2_ptr,  # their accumulated gradients (ACC dtype)
    gw1_ptr, gb1_ptr, gw2_ptr, gb2_ptr,  # out: the gradients applied, source · num / den (KEEP_GRAD)
    hp_ptr, num, den,
    n_w1, n_b1, n_w2, n_b2,  # element counts (n_b1 = n_b2 = 0 without bias)
    BUF_W1: tl.constexpr, BUF_B1: tl.constexpr, BUF_W2: tl.constexpr, BUF_B2: tl.constexpr,
    KEEP_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    """The update-only pass after accumulation or an all-reduce: SGD (:func:`sgd_update`) of w1, b1, w2, b2 from
    their accumulated gradients times ``num / den``, BLOCK elements per program, parameters one after another."""
    pid = tl.program_id(0)
    c_w1 = tl.cdiv(n_w1, BLOCK)
    c_b1 = c_w1 + tl.cdiv(n_b1, BLOCK)
    c_w2 = c_b1 + tl.cdiv(n_w2, BLOCK)
    if pid < c_w1:
        _update_block(w1_ptr, bw1_ptr, sw1_ptr, gw1_ptr, hp_ptr, n_w1, pid, num, den, BUF_W1, KEEP_GRAD, BLOCK)
    elif pid < c_b1:
        _update_block(b1_ptr, bb1_ptr, sb1_ptr, gb1_ptr, hp_ptr + HP_WIDTH, n_b1, pid - c_w1, num, den, BUF_B1,
                      KEEP_GRAD, BLOCK)
    elif pid < c_w2:
        _update_block(w2_ptr, bw2_ptr, sw2_ptr, gw2_ptr, hp_ptr + 2 * HP_WIDTH, n_w2, pid - c_b1, num, den, BUF_W2,
                      KEEP_GRAD, BLOCK)
    else:
        _update_block(b2_ptr, bb2_ptr, sb2_ptr, gb2_ptr, hp_ptr + 3 * HP_WIDTH, n_b2, pid - c_w2, num, den, BUF_B2,
                      KEEP_GRAD, BLOCK)


def step_rows_config(n_rows: int, n_in: int, n_hidden: int, n_out: int, dtype: torch.dtype) -> dict:
    """Launch configuration of :func:`step_rows_kernel`: the hidden layer in slices of up to 128 (one at the
    seed shape), a w2 tile (BLOCK_H × BLOCK_OUT) of at most 4096 elements, K steps of 16, 8 warps (16 for
    out > 256). At the seed shape this compiles without spills (sm_90: 170 / 128 / 80 registers for fp32 IEEE /
    TF32 / bf16; sm_80: 194 / 150 / 106); 4 warps spill in fp32 IEEE, K steps of 32 take 255 registers on sm_80
    fp32 IEEE. For out > 256 the BLOCK_M × BLOCK_OUT logit block strains the registers: out = 1024 compiles and
    fits (131 KB of shared memory), with small spills.
    """
    block_out = dot_block(n_out, MAX_OUT)
    block_h = dot_block(n_hidden, max(16, min(128, 4096 // block_out)))
    return dict(BLOCK_M=16, BLOCK_K=dot_block(n_in, 16), BLOCK_H=block_h, BLOCK_OUT=block_out,
                num_warps=8 if block_out <= 256 else 16, num_stages=2)


def step_grads_config(n_rows: int, n_in: int, n_hidden: int, n_out: int, dtype: torch.dtype) -> dict:
    """Launch configuration of :func:`step_grads_kernel`: dW1 tiles as tall as the hidden layer (up to 128, so x
    is read once), dW2 tiles as tall as ``out`` (up to 64), 16 columns, K steps of 32 rows, 8 warps: 49 + 8
    tile programs at the seed shape (twice the programs of 32 columns, for an SM-starved launch), 40 to 64
    registers without spills on sm_80 and sm_90."""
    return dict(BLOCK_A=dot_block(n_hidden, 128), BLOCK_O=dot_block(n_out, 64), BLOCK_N=16, BLOCK_B=32,
                BLOCK_R=64, num_warps=8, num_stages=2)


def stats_rows(n_rows: int, n_in: int, n_hidden: int, n_out: int, dtype: torch.dtype) -> int:
    """R, the number of rows of ``stats`` (row blocks of launch 1)."""
    return triton.cdiv(n_rows, step_rows_config(n_rows, n_in, n_hidden, n_out, dtype)["BLOCK_M"])


def step_rows(x, w1, b1, w2, b2, target, ignore_index, h, dz, dh, stats, activation="relu"):
    """Launch 1 on validated 2-D ``x`` (B ≥ 1 rows) into the caller's buffers h, dz, dh (contiguous, x's dtype)
    and ``stats`` (:func:`stats_rows` × 2, fp32, fp64 for fp64 x)."""
    n_rows, n_in = x.shape
    n_hidden, n_out = w1.shape[0], w2.shape[0]
    if n_out > MAX_OUT:
        raise ValueError(f"the Triton kernels take out_features <= {MAX_OUT}, got {n_out}; use PYFUSED_BACKEND=torch")
    cfg = step_rows_config(n_rows, n_in, n_hidden, n_out, x.dtype)
    has_bias = b1 is not None
    launch(step_rows_kernel, (triton.cdiv(n_rows, cfg["BLOCK_M"]),), x.device,
        x, w1, b1 if has_bias else w1, w2, b2 if has_bias else w2, target,  # unused pointers without bias
        h, dz, dh, stats,
        n_rows, n_in, n_hidden, n_out, ignore_index,
        x.stride(0), x.stride(1), target.stride(0),
        HAS_BIAS=has_bias, ACTIVATION=activation, ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, x.device),
        **cfg,
    )


def _fill(tensors, stand_in):
    """Pointers for a launch: ``stand_in[i]`` where ``tensors[i]`` is None (the kernel never touches those)."""
    return [stand_in[i] if t is None else t for i, t in enumerate(tensors or [None] * len(stand_in))]


def _launch_grads(x, h, dz, dh, stats, params, bufs, grads, hp, totals, loss, k, add, update):
    n_rows, n_in = x.shape
    n_hidden, n_out = h.shape[1], dz.shape[1]
    cfg = step_grads_config(n_rows, n_in, n_hidden, n_out, x.dtype)
    tiles_w1 = triton.cdiv(n_hidden, cfg["BLOCK_A"]) * triton.cdiv(n_in, cfg["BLOCK_N"])
    tiles_w2 = triton.cdiv(n_out, cfg["BLOCK_O"]) * triton.cdiv(n_hidden, cfg["BLOCK_N"])
    w1, b1, w2, b2 = params
    stand_in = [w1, w1, w2, w2]
    launch(step_grads_kernel, (tiles_w1 + tiles_w2 + 1,), x.device,
        x, h, dz, dh, stats,
        *_fill(params, stand_in), *_fill(bufs, stand_in), *_fill(grads, stand_in), hp,
        stats if totals is None else totals, loss, k, add,
        n_rows, n_in, n_hidden, n_out, stats.shape[0],
        x.stride(0), x.stride(1), tiles_w1, tiles_w2,
        UPDATE=update, GLOBAL=totals is not None, HAS_BIAS=b1 is not None,
        BUF_W1=bufs[0] is not None, BUF_B1=bufs[1] is not None, BUF_W2=bufs[2] is not None,
        BUF_B2=bufs[3] is not None, KEEP_GRAD=update and grads is not None,
        ACC=acc_dtype(x.dtype), PRECISION=dot_precision(x.dtype, x.device), **cfg,
    )


def step_grads(x, h, dz, dh, stats, params, bufs, grads, hp, loss):
    """Launch 2: SGD on ``params = (w1, b1, w2, b2)`` (b1, b2 None without bias) in place, with momentum ``bufs``
    (None where a parameter has none) and, unless ``grads`` is None, the gradients written to ``grads`` (four
    tensors shaped like params). ``hp`` is (4, HP_WIDTH) in the accumulator dtype; ``loss`` the 0-dim output."""
    _launch_grads(x, h, dz, dh, stats, params, bufs, grads, hp, None, loss, 1, 0, True)


def step_accumulate(x, h, dz, dh, stats, params, sums, totals, k, add, loss):
    """Launch 2 without the update: ``sums = (dw1, db1, dw2, db2)`` (accumulator dtype; None for absent
    biases) receive — or, with ``add``, have added — this batch's gradient of the mean loss divided by ``k``.
    The mean is over ``totals = (Σ nll, count)`` (a (2,) tensor, e.g. all-reduced over ranks) when given, else
    over the local ``stats``; ``loss`` receives Σ nll / count."""
    _launch_grads(x, h, dz, dh, stats, params, [None] * 4, sums, stats, totals, loss, k, int(add), False)  # hp unread


def step_update(params, bufs, sums, grads, hp, num=1, den=1):
    """The update-only pass: SGD on ``params`` from ``sums · num / den`` (the accumulated gradients), with
    momentum ``bufs`` and hyper-parameters ``hp`` as in :func:`step_grads`; ``grads`` (or None) receive the
    gradients applied."""
    w1, b1, w2, b2 = params
    block = 1024
    sizes = [0 if p is None else p.numel() for p in params]
    stand_in = [w1, w1, w2, w2]
    launch(step_update_kernel, (sum(triton.cdiv(n, block) for n in sizes),), w1.device,
        *_fill(params, stand_in), *_fill(bufs, stand_in), *_fill(sums, [sums[0], sums[0], sums[2], sums[2]]),
        *_fill(grads, stand_in),
        hp, num, den, *sizes,
        BUF_W1=bufs[0] is not None, BUF_B1=bufs[1] is not None, BUF_W2=bufs[2] is not None,
        BUF_B2=bufs[3] is not None, KEEP_GRAD=grads is not None, BLOCK=block, num_warps=4,
    )
