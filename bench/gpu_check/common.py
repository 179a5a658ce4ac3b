"""What the stages of ``python -m bench.gpu_check`` share: sizes, dtypes, the kernel backend for the checks."""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("environment", "correctness", "launches", "seed_job", "timings", "registers")
SEED = (128, 784, 128, 10)
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


def with_precision(mode):
    """The benchmark's TF32 switch (bench.cases.precision) for a mode."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.cases import precision

    return precision(mode)


@contextlib.contextmanager
def kernel_backend(cuda: bool):
    """The Triton kernels for every check: on CUDA by default; on CPU through the interpreter."""
    saved = os.environ.get("PYFUSED_BACKEND")
    os.environ["PYFUSED_BACKEND"] = "auto" if cuda else "triton"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYFUSED_BACKEND", None)
        else:
            os.environ["PYFUSED_BACKEND"] = saved


def copy_model(model):
    return copy.deepcopy(model)
