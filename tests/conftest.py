"""Shared fixtures.

Without a GPU, Triton kernels run on Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is first imported, hence here, at collection time. The ``backend`` fixture runs a test once on the
pure-torch path and once on the Triton kernels (interpreter on CPU, real kernels on CUDA); ``step_backend`` adds,
for FusedTrainStep's tests on CPU, ``onednn``: the default ``auto``, whose torch path runs the GEMMs on oneDNN
(:mod:`pyfused.cpu_gemm`), here at every size, not only from ``MIN_MACS`` multiply-adds.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("PYFUSED_BACKEND", request.param)
    return request.param


@pytest.fixture(params=["torch", "triton", "onednn"])
def step_backend(request, monkeypatch):
    if request.param == "onednn":
        from pyfused import cpu_gemm

        if DEVICE != "cpu" or not cpu_gemm.available():
            pytest.skip("oneDNN GEMMs are the torch path's on CPU (auto on CUDA runs the kernels)")
        monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1)
    monkeypatch.setenv("PYFUSED_BACKEND", "auto" if request.param == "onednn" else request.param)
    return request.param


@pytest.fixture
def device():
    return DEVICE
