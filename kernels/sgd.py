"""Fused momentum SGD: every parameter of a group updated in place by one launch (one per dtype in a group).

Math (torch.optim.SGD's, in float32 whatever the parameter dtype), per element, with lr ``η``, momentum
``γ``, dampening ``τ``, weight decay ``λ``::

    g = −grad if MAXIMIZE else grad
    g = g + λ·p                                  (HAS_WD)
    b = g if fresh else γ·b + (1 − τ)·g          (HAS_MOMENTUM; b is the momentum buffer, stored back)
    g = g + γ·b if NESTEROV else b               (HAS_MOMENTUM)
    p = p − η·g

Multi-tensor design: a device int64 table describes the T tensors of the launch. Rows ``table[t] =
(param address, grad address, buffer address, numel, first block)``, then ``fresh[t]`` (1 where the
buffer has no history yet, so ``b = g``), then ``block_map[k] = t`` for each of the ``n_blocks`` blocks of
BLOCK elements (a tensor of numel n owns ⌈n / BLOCK⌉ consecutive blocks; empty tensors own none). Program
k loads its row, casts the addresses to ``DTYPE`` pointers and updates one block in place: unmasked (and
vectorised when ALIGNED) for full blocks, masked for a tensor's last one. The table is built by
:func:`make_sgd_table` with one host→device copy (pinned on CUDA), and is meant to be cached by the caller
until an address changes, so a step allocates nothing and never synchronises with the host.

Kernel signature (for compile checks): ``table_ptr: *i64, fresh_ptr: *i64, block_map_ptr: *i64,
lr: fp32 (or *fp32 when LR_IS_PTR), momentum: fp32, dampening_complement: fp32, weight_decay: fp32``;
constexprs ``DTYPE`` (tl.float32 / tl.float16 / tl.bfloat16), ``BLOCK``, ``ALIGNED``, ``LR_IS_PTR``,
``HAS_WD``, ``HAS_MOMENTUM``, ``NESTEROV``, ``MAXIMIZE``. Grid ``(n_blocks,)``; :func:`sgd_config` gives
``BLOCK`` and ``num_warps``.

Traffic per step, N elements of s bytes: ``N·s·(3 + 2·[γ ≠ 0])`` (read p, grad, buffer; write p, buffer;
a fresh buffer is written, not read) plus ``(48 + 8·[γ ≠ 0])·n_blocks`` bytes of table reads (a map entry,
five row fields and the fresh flag per program, mostly from L2), plus 4 bytes per program for a tensor lr.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import launch

ROW = tl.constexpr(5)  # int64 fields per tensor row: param, grad, buffer addresses, numel, first block
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _sgd_block(p_ptr, g_ptr, b_ptr, offs, mask, fresh, lr, momentum, dampening_complement, weight_decay,
               MASKED: tl.constexpr, HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
               NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr):
    """One block of the update above: loads p, grad (and b), stores p (and b); ``mask`` only when MASKED.
    (Loads and stores are written out per case: a nested @jit helper costs the interpreter ~1 ms a call.)"""
    if MASKED:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if HAS_WD:
        g = g + weight_decay * p
    if HAS_MOMENTUM:
        if fresh:
            b = g
        else:
            if MASKED:
                b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                b = tl.load(b_ptr + offs).to(tl.float32)
            b = momentum * b + dampening_complement * g
        if MASKED:
            tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty))
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p - lr * g
    if MASKED:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty))


@triton.jit
def sgd_kernel(
    table_ptr,  # (T, ROW) int64: param, grad, buffer addresses, numel, first block of each tensor
    fresh_ptr,  # (T,) int64: 1 where the momentum buffer is new (b = g), else 0 (read when HAS_MOMENTUM)
    block_map_ptr,  # (n_blocks,) int64: tensor index of each block
    lr,  # fp32 learning rate, or a pointer to the 1-element tensor holding it (LR_IS_PTR; any float dtype)
    momentum, dampening_complement, weight_decay,  # fp32: γ, 1 − τ, λ
    DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, LR_IS_PTR: tl.constexpr,
    HAS_WD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
):
    """In-place SGD on block ``program_id`` of the tensor that owns it (math and layout: module docstring)."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(block_map_ptr + pid)
    row = table_ptr + t * ROW
    p_ptr = tl.load(row).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    b_ptr = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        b_ptr = tl.multiple_of(b_ptr, 16)
    n = tl.load(row + 3)
    block = pid - tl.load(row + 4)
    offs = block * BLOCK + tl.arange(0, BLOCK)
    fresh = 0
    if HAS_MOMENTUM:
        fresh = tl.load(fresh_ptr + t)
    if LR_IS_PTR:
        lr = tl.load(lr).to(tl.float32)
    if (block + 1) * BLOCK <= n:
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, None, fresh != 0, lr, momentum, dampening_complement, weight_decay,
                   False, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE)
    else:
        _sgd_block(p_ptr, g_ptr, b_ptr, offs, offs < n, fresh != 0, lr, momentum, dampening_complement,
                   weight_decay, True, HAS_WD, HAS_MOMENTUM, NESTEROV, MAXIMIZE)


def sgd_config(max_numel: int, dtype: torch.dtype) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for a launch whose largest tensor has ``max_numel`` elements of ``dtype``.

    BLOCK is a power of two covering the largest tensor, between one 16-byte vector per thread of a warp and
    2048 elements; num_warps = BLOCK / 256 (1 to 8) leaves each thread at most 8 elements per tensor: at
    most 80 registers and no spills on sm_80/sm_90 (4096 × 8 warps needed 164 on sm_90, a quarter of the
    occupancy).
    """
    block = min(2048, max(512 // dtype.itemsize, triton.next_power_of_2(max(1, max_numel))))
    return block, max(1, block // 256)


@dataclass
class SGDTable:
    """A device table for :func:`fused_sgd` (layout: module docstring) and the launch settings it implies.
    ``fresh_pending``: some fresh flags are still set on the device (cleared after the next launch)."""

    rows: torch.Tensor
    fresh: torch.Tensor
    block_map: torch.Tensor
    dtype: torch.dtype
    block: int
    num_warps: int
    aligned: bool
    fresh_pending: bool

    @property
    def n_blocks(self) -> int:
        return self.block_map.numel()


def make_sgd_table(params, grads, buffers, fresh) -> SGDTable:
    """The table of same-dtype, same-device tensors ``params``, ``grads`` and ``buffers`` (None entries when
    momentum is off), dense and laid out alike; ``fresh[i]`` marks buffers without history. One H2D copy."""
    dtype, device = params[0].dtype, params[0].device
    numels = [p.numel() for p in params]
    block, num_warps = sgd_config(max(numels), dtype)
    counts = [triton.cdiv(n, block) for n in numels]
    rows, first, addresses = [], 0, []
    for p, g, b, n, c in zip(params, grads, buffers, numels, counts):
        trio = (p.data_ptr(), g.data_ptr(), 0 if b is None else b.data_ptr())
        rows.extend((*trio, n, first))
        addresses.extend(trio)
        first += c
    index = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(counts, dtype=torch.int64))
    host = torch.cat([torch.tensor(rows, dtype=torch.int64), torch.tensor(fresh, dtype=torch.int64), index])
    if device.type == "cuda":
        host = host.pin_memory()
    table = host.to(device, non_blocking=True)
    n_rows = len(params) * ROW.value
    return SGDTable(table[:n_rows], table[n_rows:n_rows + len(params)], table[n_rows + len(params):], dtype,
                    block, num_warps, all(a % 16 == 0 for a in addresses), any(fresh))


def fused_sgd(table: SGDTable, lr, *, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
              maximize: bool) -> None:
    """Launch :func:`sgd_kernel` over ``table``: one launch updates every tensor in it, in place.

    ``lr`` is a float or a 1-element tensor on the table's device (read by the kernel: no host sync). The
    fresh flags are cleared on the device afterwards, so the table stays valid for the next step.
    """
    if table.n_blocks == 0:
        return
    has_momentum = momentum != 0
    lr_is_ptr = isinstance(lr, torch.Tensor)
    launch(sgd_kernel, (table.n_blocks,), table.rows.device,
        table.rows, table.fresh, table.block_map, lr if lr_is_ptr else float(lr),
        float(momentum), 1.0 - float(dampening), float(weight_decay),
        DTYPE=TL_DTYPES[table.dtype], BLOCK=table.block, ALIGNED=table.aligned, LR_IS_PTR=lr_is_ptr,
        HAS_WD=weight_decay != 0, HAS_MOMENTUM=has_momentum, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
        num_warps=table.num_warps,
    )
    if table.fresh_pending:
        table.fresh.zero_()
        table.fresh_pending = False
