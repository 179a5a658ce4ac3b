"""Shared fixtures.

Without a GPU, Triton kernels run on Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be set before
triton is first imported, hence here, at collection time. The ``backend`` fixture runs a test once on the
pure-torch path and once on the Triton kernels (interpreter on CPU, real kernels on CUDA).
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


@pytest.fixture
def device():
    return DEVICE
