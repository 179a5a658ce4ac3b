"""Backend dispatch: the Triton kernels or the pure-torch path, chosen per call.

``PYFUSED_BACKEND`` (read at every call, so tests and users can switch it at run time):

- ``auto`` (default): Triton kernels for CUDA tensors, the pure-torch path for everything else;
- ``torch``: always the pure-torch path (:mod:`pyfused.torch_ops`);
- ``triton``: always the kernels. CPU tensors are accepted only under Triton's interpreter
  (``TRITON_INTERPRET=1``, which must be set before ``triton`` is first imported).

The kernels are imported lazily, on first use, so that ``import pyfused`` never imports triton nor
queries a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def requested() -> str:
    """The backend named by ``PYFUSED_BACKEND`` (``auto`` when unset)."""
    name = os.environ.get("PYFUSED_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"PYFUSED_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def interpreting() -> bool:
    """True when Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0")


def use_triton(device: torch.device, dtype: torch.dtype | None = None, n_out: int | None = None) -> bool:
    """Whether tensors on ``device`` (of ``dtype``, for a net of ``n_out`` output features) go through the Triton
    kernels (True) or the torch path. ``auto`` sends a net wider than the kernels take
    (:func:`pyfused.kernels.rows.max_out`: 1024 outputs in 16-bit dtypes, 512 in float32, 256 in float64) to the
    torch path; ``triton`` keeps it on the kernels, which raise ValueError before any launch.

    Raises RuntimeError, before anything runs, when ``PYFUSED_BACKEND=triton`` is asked for tensors that
    the kernels cannot take: CPU tensors without the interpreter, or bfloat16 under the interpreter (which
    computes garbage for it instead of failing).
    """
    name = requested()
    if name == "torch":
        return False
    if device.type == "cuda":
        if name == "auto" and n_out is not None and dtype is not None:
            from pyfused.kernels.rows import max_out

            return n_out <= max_out(dtype)
        return True
    if name == "auto":
        return False
    if device.type == "cpu" and interpreting():
        if dtype == torch.bfloat16:
            raise RuntimeError("Triton's interpreter does not support bfloat16; use PYFUSED_BACKEND=torch on CPU")
        return True
    raise RuntimeError(
        f"PYFUSED_BACKEND=triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported; got tensors on {device}"
    )


@functools.cache
def _engines():
    from pyfused.engines import KernelEngine, TorchEngine

    return KernelEngine(), TorchEngine()


def engine(device: torch.device, dtype: torch.dtype | None = None, n_out: int | None = None):
    """The engine of the fused ops for tensors on ``device`` (:mod:`pyfused.engines`): the Triton kernels or the
    pure-torch twins, by :func:`use_triton`."""
    kernels, twins = _engines()
    return kernels if use_triton(device, dtype, n_out) else twins


def engine_for(x: torch.Tensor, w_last: torch.Tensor):
    """:func:`engine` for input ``x`` of a net whose last weight is ``w_last`` (its rows: the output features)."""
    return engine(x.device, x.dtype, w_last.shape[0])
