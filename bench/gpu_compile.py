"""Compile pyfused's Triton kernels for real NVIDIA GPUs on a machine without one, and measure them.

Triton's interpreter accepts kernels that a GPU compiler rejects, or that overflow shared memory or spill
registers; this module checks the real thing. A :class:`Case` names a launcher call (kernel variant, sizes,
mode = dtype and matmul precision, bias) and a target architecture. :func:`capture` runs the real launcher
on ``meta`` tensors (shapes, dtypes and strides, no memory) with its ``@triton.jit`` kernel swapped for a
recorder, so the grid, arguments, flags, block sizes, warps and stages are the ones the launcher would use:
its config function (``rows_config``, ``grads_config``, ``optimizer_config``) is called by the
launcher itself, there is no second copy to drift. Triton's own argument binder specialises the arguments for
the target (pointer types, ints divisible by 16, ints equal to 1), ``triton.compile`` lowers the kernel to PTX
and a cubin, and Triton's bundled ``ptxas -v``, run again on that PTX with Triton's flags, reports registers
and spills. :func:`blocks_per_sm` turns registers, warps and shared memory into resident blocks per SM.

``@triton.jit`` returns interpreter objects when ``TRITON_INTERPRET`` is set at import, so
:func:`compile_cases` does the work in a fresh ``python -m bench.gpu_compile`` process without it,
compiling in a process pool and caching each result as JSON in a folder (a temp dir by default) under a key
made of the kernel's source hash, its specialised arguments, the target, Triton's version and this file.
Importing this module imports neither triton nor the kernels.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyfused import checks


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of a compute capability (values below, with their sources)."""

    name: str
    capability: int
    smem_per_sm: int  # bytes, largest shared-memory carveout
    smem_per_block: int  # bytes, opt-in maximum per block (sharedMemPerBlockOptin)
    max_blocks_per_sm: int
    max_threads_per_sm: int = 2048
    regs_per_sm: int = 65536  # 32-bit registers; also the per-block maximum
    max_regs_per_thread: int = 255
    smem_reserved_per_block: int = 1024  # reserved by the driver for every block (compute capability >= 8)
    smem_granularity: int = 128  # bytes
    reg_granularity: int = 256  # registers per warp
    sub_partitions: int = 4


# Shared memory per SM / per block, threads per SM, registers: CUDA C++ Programming Guide, "Technical
# Specifications per Compute Capability" (8.0: 164 KB per SM, 163 KB per block; 9.0: 228 KB, 227 KB; 2048
# threads and 64 K registers per SM, 255 per thread), and the Ampere / Hopper tuning guides (§ "Occupancy",
# same numbers; 1 KB per block reserved for the system). Blocks per SM, allocation granularities and
# sub-partitions: NVIDIA's occupancy calculator header ``cuda_occupancy.h`` (shipped with Triton in
# ``triton/backends/nvidia/include``): cudaOccMaxBlocksPerMultiprocessor (32 for 8.0 and 9.x),
# cudaOccSMemAllocationGranularity (128), cudaOccRegAllocationGranularity (256), 4 sub-partitions.
ARCHS = {
    "sm_80": Arch("sm_80", 80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024, max_blocks_per_sm=32),
    "sm_90": Arch("sm_90", 90, smem_per_sm=228 * 1024, smem_per_block=227 * 1024, max_blocks_per_sm=32),
}
SM_COUNTS = {"sm_80": 108, "sm_90": 132}  # A100, H100/H200: what the weight-gradient split is sized for
MODES = ("fp32", "tf32", "bf16", "fp16", "fp64")  # fp32: IEEE float32 matmuls; tf32: float32 with TF32 tl.dot
MLP_KERNELS = {  # variant: (module in pyfused.kernels, kernel attribute, what the variant is)
    "forward_loss": ("rows", "rows_kernel", "module forward + NLL (mean): activations, stats and dz kept"),
    "forward": ("rows", "rows_kernel", "module forward: activations and log-probabilities kept"),
    "forward_eval": ("rows", "rows_kernel", "module forward, log-probabilities only (inference)"),
    "forward_mse": ("rows", "rows_kernel", "module forward + MSE (sum), logits head: activations, stats, dz kept"),
    "rows_loss": ("rows", "rows_kernel", "module backward rows from the saved logit gradient (mean)"),
    "rows": ("rows", "rows_kernel", "module backward rows from dy through log_softmax"),
    "grads": ("grads", "grads_kernel", "module weight gradients dW, db (x without grad)"),
    "grads_dx": ("grads", "grads_kernel", "module weight gradients and dx"),
}
SGD_KERNELS = {  # the multi-tensor optimizer kernel (FusedSGD, FusedAdam/AdamW, the train step's update pass)
    "sgd": ("optimizers", "optimizer_kernel", "FusedSGD: momentum SGD over the model's parameters"),
    "sgd_plain": ("optimizers", "optimizer_kernel", "FusedSGD without momentum, tensor lr"),
    "adam": ("optimizers", "optimizer_kernel", "FusedAdam / FusedAdamW"),
    "adam_amsgrad": ("optimizers", "optimizer_kernel", "FusedAdam, amsgrad, tensor lr"),
}
STEP_KERNELS = {
    "step_rows": ("rows", "rows_kernel", "FusedTrainStep launch 1: forward, NLL, dz, hidden gradients, row stats"),
    "step_rows_mse": ("rows", "rows_kernel", "FusedTrainStep launch 1 with MSE on a logits head"),
    "step_grads": ("grads", "grads_kernel", "FusedTrainStep launch 2: dW tiles + momentum SGD, loss"),
    "step_grads_adam": ("grads", "grads_kernel", "FusedTrainStep launch 2: dW tiles + Adam, loss"),
    "step_accumulate": ("grads", "grads_kernel",
                        "FusedTrainStep launch 2, accumulating (process group / accumulation_steps)"),
    "step_update": ("optimizers", "optimizer_kernel", "FusedTrainStep update-only pass after accumulation (SGD, "
                    "float32 sums)"),
}
SEED = (128, 784, 128, 10)  # rows, in, hidden, out of the reference workload
ACTIVATION_KERNELS = ("forward_loss", "forward", "forward_eval", "forward_mse", "rows_loss", "rows", "step_rows",
                      "step_rows_mse")
DEEP_KERNELS = ("forward_loss", "rows_loss", "grads", "step_rows", "step_grads")  # compiled at depth 3 too
# the kernels of a seed step: module path, FusedTrainStep, and FusedTrainStep accumulating / data-parallel
SEED_KERNELS = ("forward_loss", "rows_loss", "grads", "sgd", "step_rows", "step_grads", "step_accumulate",
                "step_update")
ALL_KERNELS = {**MLP_KERNELS, **SGD_KERNELS, **STEP_KERNELS}
# The course's programs at their own shapes (rows, in, hidden, out, extra hidden layers) with the kernels each
# runs — module path and FusedTrainStep, plain and accumulating: these must not spill.
COURSE = {
    "fashion-mnist fit (784-128-10, NLL, SGD)": (
        (128, 784, 128, 10, ()),
        ("forward_loss", "forward", "forward_eval", "rows_loss", "rows", "grads", "grads_dx", "sgd", "sgd_plain",
         "step_rows", "step_grads", "step_accumulate", "step_update")),
    "regression (1000-100-10, MSE, SGD / Adam)": (
        (64, 1000, 100, 10, ()),
        ("forward_mse", "rows_loss", "grads", "sgd_plain", "adam", "step_rows_mse", "step_grads", "step_grads_adam",
         "step_accumulate", "step_update")),
    "small net (20-13-8-3, cross-entropy, SGD)": (
        (64, 20, 13, 3, (8,)),
        ("forward_loss", "forward", "rows_loss", "grads", "sgd", "sgd_plain", "step_rows", "step_grads")),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One launcher call to compile: kernel variant, sizes, mode (``MODES``), bias, target (``ARCHS``)."""

    kernel: str
    arch: str
    mode: str
    bias: bool = True
    n_rows: int = SEED[0]
    n_in: int = SEED[1]
    n_hidden: int = SEED[2]
    n_out: int = SEED[3]
    activation: str = "relu"  # the hidden activation, for the kernels that take one (ACTIVATION_KERNELS)
    extra_hidden: tuple = ()  # further hidden layers after the first (n_hidden): a deeper MLP
    split: int | None = None  # the weight-gradient kernels' S (None: the launcher's choice for the arch's SMs)
    hsplit: int | None = None  # the row kernels' G (programs per row block sharing the hidden layer), likewise

    @property
    def widths(self) -> tuple:
        return (self.n_in, self.n_hidden, *self.extra_hidden, self.n_out)

    @property
    def depth(self) -> int:
        return 2 + len(self.extra_hidden)

    @property
    def shape(self) -> str:
        return f"{self.n_rows}×" + "→".join(map(str, self.widths))

    def __str__(self) -> str:
        sizes = f"{self.n_rows}x" + "x".join(map(str, self.widths))
        act = "" if self.activation == "relu" else f"-{self.activation}"
        split = "" if self.split is None else f"-S{self.split}"
        split += "" if self.hsplit is None else f"-G{self.hsplit}"
        return f"{self.kernel}{act}-{self.arch}-{self.mode}-{'bias' if self.bias else 'nobias'}-{sizes}{split}"


def seed_cases(kernels=SEED_KERNELS, archs=tuple(ARCHS), depth=2, shape=None) -> list[Case]:
    """Every kernel at the seed shape (``depth`` layers, hidden layers of 128) or at ``shape`` (rows, in, hidden,
    out, extra hidden layers), for every arch, mode and bias flag, and every activation of the kernels that take
    one."""
    rows, n_in, hidden, out, extra = shape or (*SEED, (SEED[2],) * (depth - 2))
    return [Case(k, a, m, b, rows, n_in, hidden, out, activation=act, extra_hidden=tuple(extra))
            for k in kernels for a in archs for m in MODES for b in (True, False)
            for act in (checks.ACTIVATIONS if k in ACTIVATION_KERNELS else ("relu",))]


COURSE_LARGE_ROWS = 16384  # the course's programs at a large batch too: the launchers' large-batch tiles


def course_cases(archs=tuple(ARCHS), n_rows=None) -> list[Case]:
    """The kernels of each course program at its own shape (:data:`COURSE`) — or at ``n_rows`` rows (e.g.
    :data:`COURSE_LARGE_ROWS`) —, every arch, mode, bias, activation."""
    return list(dict.fromkeys(c for shape, kernels in COURSE.values()
                              for c in seed_cases(kernels, archs, shape=(n_rows or shape[0], *shape[1:]))))


def sweep_cases(kernels=SEED_KERNELS, archs=tuple(ARCHS), modes=MODES) -> list[Case]:
    """Sizes swept one at a time around the seed (batch 1..65536, in 16..4096, hidden 16..1024, out 2..1024)
    plus the two corners, for every kernel, arch and mode, with bias. The values are those where a config
    function or Triton's specialisation changes (1, sizes not divisible by 16, the 4096-row threshold,
    block caps), not a grid: the other sizes compile to one of these kernels. The row kernel's variants only up
    to the outputs it takes in the mode's dtype (:func:`pyfused.kernels.rows.max_out`: wider nets take the torch
    path)."""
    from pyfused.kernels.rows import max_out

    rows, n_in, hidden, out = SEED
    shapes = ([(b, n_in, hidden, out) for b in (1, 100, 4097, 65536)]
              + [(rows, i, hidden, out) for i in (16, 4096)]
              + [(rows, n_in, h, out) for h in (16, 1024)]
              + [(rows, n_in, hidden, o) for o in (2, 128, 256, 512, 1024)]
              + [(1, 16, 16, 2), (65536, 4096, 1024, 1024)])
    return [Case(k, a, m, True, *s) for s in shapes for k in kernels for a in archs for m in modes
            if ALL_KERNELS[k][0] != "rows" or s[3] <= max_out(_dtype(m))]


@dataclasses.dataclass
class Launch:
    """What a launcher passed to ``kernel[grid](*args, **kwargs)``."""

    module: str
    name: str
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def _dtype(mode: str):
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "fp64": torch.float64}[mode]


def step_layout(case: Case, device="meta") -> tuple[int, object]:
    """``(R, row partials)`` of the case's train-step launch 1: its row blocks (the statistics' rows) and the
    last layer's row-partials buffer on ``device``, or None (:func:`pyfused.kernels.rows.row_partials_buffer`,
    as :class:`pyfused.step_kernels.KernelStepPath` makes them)."""
    from pyfused.kernels.rows import row_partials_buffer, rows_config

    dtype, precision = _dtype(case.mode), "tf32" if case.mode == "tf32" else "ieee"
    cfg = rows_config(case.n_rows, case.widths, dtype, forward=True, backward=True, precision=precision)
    return (-(-case.n_rows // cfg["BLOCK_M"]),
            row_partials_buffer(case.n_rows, case.widths, dtype, precision, device))


def _call_launcher(case: Case, module, device="meta") -> None:
    """Call the launcher of ``case.kernel`` on zero tensors of the case's sizes: ``meta`` tensors to capture the
    launch without a GPU, or CUDA tensors to compile and run it there (``python -m bench.gpu_check``)."""
    import torch

    dtype = _dtype(case.mode)
    acc = torch.promote_types(dtype, torch.float32)  # the launchers' statistics / sums dtype
    k = case.kernel

    def t(*shape, dt=dtype):
        return torch.zeros(shape, device=device, dtype=dt)

    widths = case.widths
    n_rows, n_layers = case.n_rows, case.depth
    x = t(n_rows, case.n_in)
    weights = [t(widths[i + 1], widths[i]) for i in range(n_layers)]
    biases = [t(n) if case.bias else None for n in widths[1:]]
    acts_names = (case.activation,) * (n_layers - 1)
    acts = [t(n_rows, n) for n in widths[1:-1]]
    if module.__name__.endswith(".rows"):
        out = t(n_rows, case.n_out)
        loss = "mse" if k.endswith("mse") else "class"
        target = t(n_rows, case.n_out) if loss == "mse" else t(n_rows, dt=torch.int64)
        stats = t(module.n_row_blocks(n_rows, widths, dtype, backward=k.startswith("step"),
                                      device=torch.device("cuda")), 2, dt=acc)
        split = dict(split=case.hsplit, sm_count=SM_COUNTS.get(case.arch))
        if k.startswith("step"):
            parts = step_layout(case, device)[1]  # as the train step's workspace has them
            module.rows(x, weights, biases, acts_names, head="logits" if loss == "mse" else "log_softmax", loss=loss,
                        target=target, acts=acts, dpres=[t(n_rows, n) for n in widths[1:-1]],
                        dz=out if parts is None else None, stats=stats, row_partials=parts, **split)
        elif k in ("forward_loss", "forward_mse"):
            module.rows(x, weights, biases, acts_names, head="logits" if loss == "mse" else "log_softmax", loss=loss,
                        target=target, acts=acts, dz=out, stats=stats, **split)
        elif k == "forward":
            module.rows(x, weights, biases, acts_names, acts=acts, out=out, **split)
        elif k == "forward_eval":
            module.rows(x, weights, biases, acts_names, acts=acts[:-1] + [None], out=out, store_last=False, **split)
        else:
            grad = dict(grad_in="dlogits", g=out, scale=t(dt=acc)) if k == "rows_loss" else \
                dict(grad_in="dy", g=t(n_rows, case.n_out), y=out)
            module.rows(x, weights, [None] * n_layers, acts_names, acts=acts,
                        dpres=[t(n_rows, n) for n in widths[1:-1]], dz=t(n_rows, case.n_out), forward=False, **grad)
        return
    if module.__name__.endswith(".grads"):
        dpres = [t(n_rows, n) for n in widths[1:]]
        like = lambda dt: [None if p is None else t(*p.shape, dt=dt) for pair in zip(weights, biases)  # noqa: E731
                           for p in pair]
        flags = dict(need=(True,) * n_layers, has_bias=tuple(b is not None for b in biases),
                     sm_count=SM_COUNTS.get(case.arch), split=case.split)
        if k.startswith("step"):
            n_blocks, flags["row_partials"] = step_layout(case, device)
        if k in ("grads", "grads_dx"):
            dx = t(n_rows, case.n_in) if k == "grads_dx" else None
            module.grads(x, weights, acts, dpres, grads=like(dtype), dx=dx, **flags)
            return
        params = [p for pair in zip(weights, biases) for p in pair]
        stats = t(n_blocks, 2, dt=acc)  # R rows: the row blocks of the train step's launch 1
        if k == "step_accumulate":  # with a process group's all-reduced totals
            module.grads(x, weights, acts, dpres, epilogue="accumulate", grads=like(acc), stats=stats,
                         totals=t(2, dt=acc), loss=t(), k=3, add=True, **flags)
            return
        adam = k == "step_grads_adam"
        states = (like(dtype), like(dtype) if adam else [None] * len(params), [None] * len(params))
        steps = [None if p is None else t(dt=torch.float32) for p in params] if adam else None
        module.grads(x, weights, acts, dpres, epilogue="update", params=params, states=states, steps=steps,
                     book=t(2, len(params), dt=torch.int32), hp=t(len(params), 8, dt=torch.float64),
                     optimizer="adam" if adam else "sgd", has_state=tuple(p is not None for p in params),
                     stats=stats, loss=t(), **flags)
        return
    params = [p for pair in zip(weights, biases) for p in pair if p is not None]
    adam, state = k.startswith("adam"), k in ("sgd", "adam", "adam_amsgrad", "step_update")
    n_states = (3 if k == "adam_amsgrad" else 2) if adam else int(state)
    grad_dtype = acc if k == "step_update" else dtype
    table = module.make_table(params, [torch.zeros_like(p, dtype=grad_dtype) for p in params],
                              [[torch.zeros_like(p) for _ in range(n_states)] for p in params],
                              [t(dt=torch.float32) if adam else None for _ in params], [None] * len(params),
                              list(range(len(params))), [False] * len(params), "adam" if adam else "sgd")
    lr = t(1, dt=torch.float32) if k in ("sgd_plain", "adam_amsgrad") else None
    module.optimizer_step(table, t(len(params), 8, dt=torch.float64), optimizer="adam" if adam else "sgd",
                          has_state=state, amsgrad=k == "adam_amsgrad", lr=lr,
                          grad_scale=1.5 if k == "step_update" else 1.0)


def capture(case: Case) -> Launch:
    """The launch that the launcher of ``case.kernel`` makes for the case's sizes and mode (no GPU needed).

    The launchers pick ``PRECISION`` with :func:`pyfused.kernels.launch.dot_precision`, which says "ieee"
    off CUDA; mode "tf32" is what it says on CUDA with ``torch.backends.cuda.matmul.allow_tf32``."""
    import torch

    module_name, kernel_name, _ = ALL_KERNELS[case.kernel]
    module = importlib.import_module(f"pyfused.kernels.{module_name}")
    kernel, recorder = getattr(module, kernel_name), _Recorder()
    setattr(module, kernel_name, recorder)
    precision = getattr(module, "dot_precision", None)
    if case.mode == "tf32" and precision is not None:  # what dot_precision says on CUDA with TF32 on
        module.dot_precision = lambda dtype, device: "tf32" if dtype == torch.float32 else precision(dtype, device)
    try:
        _call_launcher(case, module)
    finally:
        setattr(module, kernel_name, kernel)
        if precision is not None:
            module.dot_precision = precision
    if len(recorder.launches) != 1:
        raise RuntimeError(f"{case}: expected one launch of {kernel_name}, got {len(recorder.launches)}")
    grid, args, kwargs = recorder.launches[0]
    if case.mode == "tf32" and "PRECISION" in kwargs:
        kwargs = {**kwargs, "PRECISION": "tf32"}
    return Launch(module.__name__, kernel_name, tuple(grid), args, kwargs)


def _specialise(launch: Launch, arch: Arch) -> dict:
    """Triton's binding of the launch for ``arch`` (what ``JITFunction.run`` does before compiling)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(importlib.import_module(launch.module), launch.name)
    backend = make_backend(GPUTarget("cuda", arch.capability, 32))
    kwargs = dict(launch.kwargs, debug=fn.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return dict(module=launch.module, name=launch.name, cache_key=fn.cache_key, capability=arch.capability,
                signature=signature, constexprs=constexprs, attrs=attrs, options=options.__dict__)


def parse_ptxas(log: str) -> dict:
    """Registers, spill stores/loads, stack frame and static shared memory (bytes) from ``ptxas -v``."""
    def grab(pattern):
        match = re.search(pattern, log)
        if match is None:
            raise ValueError(f"ptxas -v output has no match for {pattern!r}:\n{log}")
        return int(match.group(1))

    smem = re.search(r"(\d+) bytes smem", log)  # absent when the kernel has no static shared memory
    return dict(regs=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"),
                static_smem=int(smem.group(1)) if smem else 0)


def _compile(job: dict) -> dict:
    """Compile one specialised launch and measure it: the resources Triton's own ``ptxas -v`` run reports (its
    flags differ between Triton releases: 3.8 adds ``--regAllocOptLevel=2``, 3.6 does not, and register
    allocation and spills follow them), Triton's shared memory, warps, time."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    start = time.perf_counter()
    log = io.StringIO()
    try:
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # make_cubin prints its ptxas -v log
            knobs.compilation.always_compile = True  # so that ptxas runs (not Triton's cache)
            kernel = triton.compile(src, target=GPUTarget("cuda", job["capability"], 32), options=job["options"])
        stats = dict(parse_ptxas(log.getvalue()), ptxas=get_ptxas(job["capability"]).version)
    except Exception as error:  # noqa: BLE001  (a failed compile is a result to report, not a crash)
        lines = [line for line in str(error).splitlines() if line.strip()]
        return dict(error=f"{type(error).__name__}: {' | '.join(lines[:6])[:600]}",
                    compile_s=time.perf_counter() - start)
    return dict(stats, error=None, shared=kernel.metadata.shared + stats["static_smem"],
                num_warps=kernel.metadata.num_warps, ptx_ops=ptx_ops(kernel.asm["ptx"]),
                compile_s=time.perf_counter() - start)


PTX_OPS = {  # what the split reductions' ordering rests on, counted in the PTX (tests/test_gpu_compile.py)
    "acq_rel_atomics": r"\batom\.global\.gpu\.acq_rel\.",  # the arrival counter's release / acquire
    "cg_loads": r"\bld\.global\.cg\.",  # the last program's loads of the others' partials and activations
    "barriers": r"\bbar\.sync\b",
}


def ptx_ops(ptx: str) -> dict:
    """How often each instruction of :data:`PTX_OPS` occurs in a kernel's PTX."""
    return {name: len(re.findall(pattern, ptx)) for name, pattern in PTX_OPS.items()}


def blocks_per_sm(arch: Arch, num_warps: int, regs: int, shared: int) -> tuple[int, str]:
    """Resident blocks per SM and the limit that binds ("warps", "regs", "smem" or "blocks"), as NVIDIA's
    occupancy calculator computes them (``cuda_occupancy.h``: cudaOccMaxBlocksPerSM{Warps,Regs,Smem}Limit),
    with the largest shared-memory carveout. 0 when one block does not fit."""
    def round_up(value, unit):
        return -(-value // unit) * unit

    regs_per_warp = round_up(max(regs, 1) * 32, arch.reg_granularity)
    regs_fit = (regs <= arch.max_regs_per_thread
                and regs_per_warp * round_up(num_warps, arch.sub_partitions) <= arch.regs_per_sm)
    warps_by_regs = (arch.regs_per_sm // arch.sub_partitions // regs_per_warp) * arch.sub_partitions
    smem = round_up(shared + arch.smem_reserved_per_block, arch.smem_granularity)
    smem_fit = smem <= arch.smem_per_block + arch.smem_reserved_per_block
    limits = {
        "blocks": arch.max_blocks_per_sm,
        "warps": arch.max_threads_per_sm // 32 // num_warps,
        "regs": warps_by_regs // num_warps if regs_fit else 0,
        "smem": arch.smem_per_sm // smem if smem_fit else 0,
    }
    binding = min(limits, key=limits.get)
    return limits[binding], binding


def _source_stamp() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _job_key(job: dict) -> str:
    from importlib.metadata import version

    material = repr((job["cache_key"], job["name"], job["capability"], sorted(job["signature"].items()),
                     sorted(job["constexprs"].items()), sorted(job["attrs"].items()), sorted(job["options"].items()),
                     version("triton"), _source_stamp()))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _serve(cases: list[Case], workers: int, cache: Path) -> list[dict]:
    """In a process without the interpreter: capture, deduplicate, compile what the cache lacks, report."""
    from importlib.metadata import version

    results_dir = cache / f"results-triton-{version('triton')}"
    results_dir.mkdir(parents=True, exist_ok=True)
    jobs, keys, launches = {}, [], []
    for case in cases:
        launch = capture(case)
        job = _specialise(launch, ARCHS[case.arch])
        key = _job_key(job)
        jobs.setdefault(key, job)
        keys.append(key)
        launches.append(launch)
    measured = {}
    for key in jobs:
        path = results_dir / f"{key}.json"
        if path.exists():
            measured[key] = json.loads(path.read_text())
    todo = [key for key in jobs if key not in measured]
    print(f"{len(cases)} cases, {len(jobs)} distinct compiles, {len(todo)} not cached", file=sys.stderr)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=context) as pool:
        for key, result in zip(todo, pool.map(_compile, [jobs[key] for key in todo])):
            measured[key] = result
            (results_dir / f"{key}.json").write_text(json.dumps(result))
    rows = []
    for case, key, launch in zip(cases, keys, launches):
        result = dict(measured[key], case=dataclasses.asdict(case), grid=list(launch.grid),
                      config={k: v for k, v in launch.kwargs.items() if isinstance(v, (bool, int, str))
                              or (isinstance(v, tuple) and all(isinstance(e, int) for e in v))})
        if result["error"] is None:
            arch = ARCHS[case.arch]
            result["blocks_per_sm"], result["limit"] = blocks_per_sm(arch, result["num_warps"], result["regs"],
                                                                     result["shared"])
            result["occupancy"] = result["blocks_per_sm"] * result["num_warps"] * 32 / arch.max_threads_per_sm
        rows.append(result)
    return rows


def default_cache() -> Path:
    """Where results are cached unless told otherwise (``PYFUSED_COMPILE_CACHE`` or the temp dir)."""
    return Path(os.environ.get("PYFUSED_COMPILE_CACHE", Path(tempfile.gettempdir()) / "pyfused-gpu-compile"))


def compile_cases(cases: list[Case], workers: int | None = None, cache: Path | None = None) -> dict[Case, dict]:
    """Compile every case for its target in a fresh process without ``TRITON_INTERPRET``, ``workers``
    compiles at a time (default: the CPU count). Returns, per case, a dict with ``error`` (None or the
    compiler's message) and else ``regs``, ``spill_stores``, ``spill_loads``, ``stack``, ``shared`` (bytes),
    ``num_warps``, ``blocks_per_sm``, ``limit``, ``occupancy`` (resident threads / maximum), plus ``config``
    (the launch's flags, block sizes, warps, stages) and ``grid``."""
    cache = Path(cache) if cache is not None else default_cache()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
    request = json.dumps(dict(cases=[dataclasses.asdict(c) for c in cases], workers=workers or os.cpu_count() or 1,
                              cache=str(cache)))
    root = str(Path(__file__).resolve().parents[1])  # bench/ is a folder of the repository, not a package
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bench.gpu_compile"], input=request, env=env, cwd=root,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"python -m bench.gpu_compile failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return dict(zip(cases, json.loads(done.stdout)))


def _main() -> None:
    request = json.loads(sys.stdin.read())
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON answer only
        rows = _serve([Case(**c) for c in request["cases"]], request["workers"], Path(request["cache"]))
    sys.stdout.write(json.dumps(rows))


if __name__ == "__main__":
    _main()
