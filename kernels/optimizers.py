"""The optimizer updates of pyfused, written once: SGD and Adam/AdamW math, the per-parameter bookkeeping, and the
multi-tensor kernel that FusedSGD, FusedAdam/FusedAdamW and FusedTrainStep's update-only pass launch.

Math (torch.optim's, elementwise in the accumulator type; the per-step scalars of Adam in float64 as torch
computes them in Python), with ``g`` the gradient and ``p`` the parameter:

- SGD (:func:`sgd_math`): ``d = ±g (+ λ·p)``; with a momentum buffer ``b = d`` on its first step, else
  ``b = γ·b + (1 − τ)·d``, then ``d = d + γ·b`` (nesterov) or ``d = b``; ``p = p − η·d``.
- Adam (:func:`adam_math`): ``g = ±g``; ``p = p·(1 − η·λ)`` (decoupled, AdamW) or ``g = g + λ·p`` (Adam);
  ``m = lerp(m, g, 1 − β₁)``; ``v = β₂·v + (1 − β₂)·g²``; ``v̂ = max(v̂, v)`` (amsgrad);
  ``p = p − η/(1 − β₁ᵗ) · m / (√v(̂) / √(1 − β₂ᵗ) + ε)`` with ``t`` the step after this one.

Hyper-parameters are rows of a float64 device tensor (:data:`HP_WIDTH` values; layouts :data:`SGD_ROW`,
:data:`ADAM_ROW`), rewritten by the host only when a value changes, so a captured CUDA graph sees schedules.

Per-parameter bookkeeping on the device, so that no step synchronises with the host: a parameter's update may be
spread over several programs (blocks of a tensor, tiles of a weight gradient); each reads its ``fresh`` flag (SGD:
the momentum buffer has no history) and its ``step`` (Adam: a float32 0-dim tensor, torch's ``state["step"]``),
then counts itself in the parameter's counter (:func:`arrive`); the last program to arrive writes ``step + 1``,
clears ``fresh`` and resets the counter to 0 (so the next launch, or a CUDA-graph replay, starts clean).

The multi-tensor kernel (:func:`optimizer_kernel`) reads a device int64 table of ``T`` rows
(:data:`TABLE_FIELDS`: addresses of the parameter, its gradient, up to three states, its step and an output
gradient, its numel, its first block and its hyper-parameter row), then ``block_map[k] = t`` for each block of
``BLOCK`` elements (an empty tensor owns one, masked, so that its step advances as torch's does); int32 ``fresh[t]`` and ``counters[t]``. One launch updates every tensor of one dtype. Traffic
per step, N elements of s bytes: SGD ``N·s·(3 + 2·[γ ≠ 0])``, Adam ``N·s·7`` (``+2`` with amsgrad), plus
~``80`` bytes of table per program (mostly L2); extra memory ``(9·8 + 8)·T + 8·n_blocks`` bytes.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import launch

HP_WIDTH = tl.constexpr(8)
SGD_ROW = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "sign")  # sign −1 maximises
ADAM_ROW = ("lr", "beta1", "beta2", "eps", "weight_decay", "sign", "decoupled")
TABLE_FIELDS = ("param", "grad", "state1", "state2", "state3", "step", "grad_out", "numel", "first_block",
                "hp_row")
ROW = tl.constexpr(len(TABLE_FIELDS))
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


@triton.jit
def sgd_math(p, g, buf, fresh, lr, momentum, dampening, weight_decay, nesterov, sign, HAS_BUF: tl.constexpr):
    """torch.optim.SGD on values: returns ``(p, buf)``; ``buf`` is returned unchanged without HAS_BUF. The
    scalars are float64 (cast to the values' type here); ``fresh``, ``nesterov`` are 0/1."""
    ty = p.dtype
    d = g * sign.to(ty)
    d = tl.where(weight_decay != 0, d + weight_decay.to(ty) * p, d)
    if HAS_BUF:
        buf = tl.where(fresh != 0, d, momentum.to(ty) * buf + (1.0 - dampening).to(ty) * d)
        d = tl.where(nesterov != 0, d + momentum.to(ty) * buf, buf)
    return p - lr.to(ty) * d, buf


@triton.jit
def adam_math(p, g, m, v, vmax, step, lr, beta1, beta2, eps, weight_decay, sign, decoupled,
              AMSGRAD: tl.constexpr):
    """torch.optim.Adam / AdamW on values: returns ``(p, m, v, vmax)`` (``vmax`` unchanged without AMSGRAD);
    ``step`` (float64) is the step this update makes (the state's count after it)."""
    ty = p.dtype
    g = g * sign.to(ty)
    if weight_decay != 0:
        if decoupled != 0:
            p = p * (1.0 - lr * weight_decay).to(ty)
        else:
            g = g + weight_decay.to(ty) * p
    w = (1.0 - beta1).to(ty)  # torch's lerp: self + w·(end − self) if w < 0.5, else end − (end − self)·(1 − w)
    m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1.0 - w))
    v = v * beta2.to(ty) + g * g * (1.0 - beta2).to(ty)
    bias1 = 1.0 - tl.exp(step * tl.log(beta1))  # float64, as torch's 1 − beta1 ** step in Python
    bias2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
    step_size = (lr / bias1).to(ty)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.sqrt(vmax) / bias2_sqrt.to(ty) + eps.to(ty)
    else:
        denom = tl.sqrt(v) / bias2_sqrt.to(ty) + eps.to(ty)
    return p - step_size * (m / denom), m, v, vmax


@triton.jit
def arrive(counter_ptr, n_programs):
    """Count this program in a parameter's counter; True in the last of its ``n_programs`` programs, which then
    finds every other one done with the parameter's bookkeeping (acquire-release atomics) and resets the counter."""
    last = tl.atomic_add(counter_ptr, 1) == n_programs - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


@triton.jit
def update_elements(
    p_ptr, g_out_ptr, s1_ptr, s2_ptr, s3_ptr, step_ptr, hp_ptr, lr, fresh, offs, mask, g,
    OPTIMIZER: tl.constexpr, HAS_STATE: tl.constexpr, AMSGRAD: tl.constexpr, KEEP_GRAD: tl.constexpr,
):
    """Load the parameter (and states) at ``offs``, apply :func:`sgd_math` or :func:`adam_math` with the gradient
    values ``g`` (the accumulator type) and the hyper-parameter row ``hp_ptr`` (``lr`` given: from the row or a
    tensor), store them back (and ``g`` to ``g_out_ptr`` when KEEP_GRAD). SGD's state 1 is the momentum buffer
    (HAS_STATE); Adam's are exp_avg, exp_avg_sq and max_exp_avg_sq (AMSGRAD)."""
    if KEEP_GRAD:
        tl.store(g_out_ptr + offs, g.to(g_out_ptr.dtype.element_ty), mask=mask)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(g.dtype)
    if OPTIMIZER == "sgd":
        buf = p
        if HAS_STATE:
            buf = tl.load(s1_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        p, buf = sgd_math(p, g, buf, fresh, lr, tl.load(hp_ptr + 1), tl.load(hp_ptr + 2), tl.load(hp_ptr + 3),
                          tl.load(hp_ptr + 4), tl.load(hp_ptr + 5), HAS_STATE)
        if HAS_STATE:
            tl.store(s1_ptr + offs, buf.to(s1_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.load(s1_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        v = tl.load(s2_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        vmax = v
        if AMSGRAD:
            vmax = tl.load(s3_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        p, m, v, vmax = adam_math(p, g, m, v, vmax, step, lr, tl.load(hp_ptr + 1), tl.load(hp_ptr + 2),
                                  tl.load(hp_ptr + 3), tl.load(hp_ptr + 4), tl.load(hp_ptr + 5),
                                  tl.load(hp_ptr + 6), AMSGRAD)
        tl.store(s1_ptr + offs, m.to(s1_ptr.dtype.element_ty), mask=mask)
        tl.store(s2_ptr + offs, v.to(s2_ptr.dtype.element_ty), mask=mask)
        if AMSGRAD:
            tl.store(s3_ptr + offs, vmax.to(s3_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def finish_parameter(counter_ptr, fresh_ptr, step_ptr, n_programs, OPTIMIZER: tl.constexpr):
    """After a program's share of one parameter's update: the last of its ``n_programs`` programs advances Adam's
    step and clears SGD's fresh flag (:func:`arrive`)."""
    if arrive(counter_ptr, n_programs):
        if OPTIMIZER == "sgd":
            tl.store(fresh_ptr, 0)
        else:
            tl.store(step_ptr, tl.load(step_ptr) + 1.0)


@triton.jit
def optimizer_kernel(
    table_ptr,  # (T, ROW) int64, fields TABLE_FIELDS
    block_map_ptr,  # (n_blocks,) int64: the tensor of each block
    fresh_ptr,  # (T,) int32: 1 where an SGD momentum buffer has no history (cleared by the kernel)
    counter_ptr,  # (T,) int32, zeros between launches
    hp_ptr,  # (rows, HP_WIDTH) float64 hyper-parameters
    lr_ptr,  # a 1-element tensor holding lr (LR_IS_PTR), else unused
    grad_scale,  # fp32 factor of the gradients (1 unless a flushed accumulation group rescales them by k / r)
    OPTIMIZER: tl.constexpr,  # "sgd" or "adam" (AdamW: the row's decoupled flag)
    DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, ACC: tl.constexpr,
    HAS_STATE: tl.constexpr, AMSGRAD: tl.constexpr, KEEP_GRAD: tl.constexpr, LR_IS_PTR: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One block of one tensor of the table, updated in place (math and layout: module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(block_map_ptr + pid)
    row = table_ptr + t * ROW
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(GRAD_DTYPE))
    s1_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    s2_ptr = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    s3_ptr = tl.load(row + 4).to(tl.pointer_type(DTYPE))
    step_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    out_ptr = tl.load(row + 6).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
    n = tl.load(row + 7)
    first = tl.load(row + 8)
    hp = hp_ptr + tl.load(row + 9) * HP_WIDTH
    if LR_IS_PTR:
        lr = tl.load(lr_ptr).to(tl.float64)
    else:
        lr = tl.load(hp)
    block = pid - first
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    if grad_scale != 1.0:
        g = g * grad_scale
    fresh = tl.load(fresh_ptr + t)
    update_elements(p_ptr, out_ptr, s1_ptr, s2_ptr, s3_ptr, step_ptr, hp, lr, fresh, offs, mask, g,
                    OPTIMIZER, HAS_STATE, AMSGRAD, KEEP_GRAD)
    finish_parameter(counter_ptr + t, fresh_ptr + t, step_ptr, tl.maximum(tl.cdiv(n, BLOCK), 1), OPTIMIZER)


def optimizer_config(max_numel: int, dtype: torch.dtype, optimizer: str) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a launch whose largest tensor has ``max_numel`` elements of ``dtype``.

    BLOCK is a power of two covering the largest tensor, between one 16-byte vector per thread of a warp and
    2048 elements (1024 for Adam, whose four streams need twice the registers); num_warps = BLOCK / 256 (1 to 8):
    at most 8 elements per thread and tensor, no spills on sm_80/sm_90 (bench/results/compile/).
    """
    cap = 2048 if optimizer == "sgd" else 1024
    block = min(cap, max(512 // dtype.itemsize, triton.next_power_of_2(max(1, max_numel))))
    return block, max(1, block // 256)


@dataclass
class OptimizerTable:
    """A device table for :func:`optimizer_step` (layout: module docstring) and the launch settings it implies."""

    rows: torch.Tensor
    block_map: torch.Tensor
    fresh: torch.Tensor
    counters: torch.Tensor
    dtype: torch.dtype
    grad_dtype: torch.dtype
    block: int
    num_warps: int
    aligned: bool

    @property
    def n_blocks(self) -> int:
        return self.block_map.numel()


def make_table(params, grads, states, steps, grad_outs, hp_rows, fresh, optimizer) -> OptimizerTable:
    """The table of same-dtype, same-device, dense ``params`` (grads of one dtype, laid out like them; ``states``
    a list of up to three tensors per parameter, like it; ``steps`` 0-dim float32 tensors or None; ``grad_outs``
    tensors or None; ``hp_rows`` row indices; ``fresh`` booleans). One host→device copy (pinned on CUDA)."""
    dtype, device = params[0].dtype, params[0].device
    numels = [p.numel() for p in params]
    block, num_warps = optimizer_config(max(numels), dtype, optimizer)
    counts = [max(1, triton.cdiv(n, block)) for n in numels]  # an empty tensor's one block advances its step
    address = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
    rows, first, aligned = [], 0, True
    for p, g, st, step, out, n, c, hp in zip(params, grads, states, steps, grad_outs, numels, counts, hp_rows):
        st = list(st) + [None] * (3 - len(st))
        rows.extend((p.data_ptr(), g.data_ptr(), *(address(s) for s in st), address(step), address(out), n, first,
                     hp))
        aligned &= p.data_ptr() % 16 == 0 and g.data_ptr() % 16 == 0
        first += c
    index = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(counts, dtype=torch.int64))
    host = torch.cat([torch.tensor(rows, dtype=torch.int64), index])
    if device.type == "cuda":
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    n_rows = len(params) * ROW.value
    flags = torch.tensor([int(f) for f in fresh] + [0] * len(params), dtype=torch.int32)
    flags = (flags.pin_memory() if device.type == "cuda" else flags).to(device, non_blocking=True)
    return OptimizerTable(table[:n_rows], table[n_rows:], flags[:len(params)], flags[len(params):], dtype,
                          grads[0].dtype, block, num_warps, aligned)


def optimizer_step(table: OptimizerTable, hp: torch.Tensor, *, optimizer: str, has_state: bool, amsgrad: bool = False,
                   lr=None, keep_grad: bool = False, grad_scale: float = 1.0, acc=None) -> None:
    """Launch :func:`optimizer_kernel` over ``table``: one launch updates every tensor in it, in place. ``hp`` is
    the float64 hyper-parameter tensor the rows index; ``lr`` a 1-element device tensor to read lr from (else
    the row's); ``acc`` the accumulator dtype (default: float64 for float64 parameters, else float32)."""
    if table.n_blocks == 0:
        return
    if acc is None:
        acc = tl.float64 if table.dtype == torch.float64 else tl.float32
    launch(optimizer_kernel, (table.n_blocks,), table.rows.device,
           table.rows, table.block_map, table.fresh, table.counters, hp, hp if lr is None else lr,
           float(grad_scale),
           OPTIMIZER=optimizer, DTYPE=TL_DTYPES[table.dtype], GRAD_DTYPE=TL_DTYPES[table.grad_dtype], ACC=acc,
           HAS_STATE=has_state, AMSGRAD=amsgrad, KEEP_GRAD=keep_grad, LR_IS_PTR=lr is not None,
           ALIGNED=table.aligned, BLOCK=table.block, num_warps=table.num_warps)
