"""Launch plumbing shared by every kernel: the matmul precision read from PyTorch's flags (both its APIs) and
the device each launch runs on."""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import pyfused
from bench import gpu_compile as gc
from pyfused.kernels import launch as launch_mod

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.fixture
def precision_flags():
    """Leave PyTorch's float32 precision flags as they were (``"none"``: the legacy API readable again)."""
    matmul = torch.backends.cuda.matmul
    saved = torch.backends.fp32_precision, matmul.fp32_precision
    yield matmul
    torch.backends.fp32_precision, matmul.fp32_precision = saved


def test_tf32_from_the_new_api_does_not_raise(precision_flags):
    """After ``fp32_precision = "tf32"`` PyTorch refuses reads of ``allow_tf32``; the launchers must not read it."""
    precision_flags.fp32_precision = "tf32"
    assert launch_mod.dot_precision(torch.float32, CUDA) == "tf32"
    precision_flags.fp32_precision = "ieee"
    assert launch_mod.dot_precision(torch.float32, CUDA) == "ieee"


def test_tf32_inherited_from_the_generic_flag(precision_flags):
    torch.backends.fp32_precision = "tf32"
    assert precision_flags.fp32_precision == "tf32"
    assert launch_mod.dot_precision(torch.float32, CUDA) == "tf32"


def test_tf32_from_the_legacy_api(precision_flags):
    assert launch_mod.dot_precision(torch.float32, CUDA) == "ieee"
    precision_flags.allow_tf32 = True
    assert launch_mod.dot_precision(torch.float32, CUDA) == "tf32"
    precision_flags.allow_tf32 = False
    assert launch_mod.dot_precision(torch.float32, CUDA) == "ieee"


@pytest.mark.parametrize("dtype, device", [(torch.float16, CUDA), (torch.bfloat16, CUDA), (torch.float64, CUDA),
                                           (torch.float32, CPU)])
def test_tf32_only_for_float32_on_cuda(precision_flags, dtype, device):
    precision_flags.fp32_precision = "tf32"
    assert launch_mod.dot_precision(dtype, device) == "ieee"


def test_bench_precision_switch_uses_the_new_api(precision_flags):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.cases import precision

    precision_flags.fp32_precision = "ieee"  # the new API in use: allow_tf32 would raise now
    with precision("tf32"):
        assert launch_mod.dot_precision(torch.float32, CUDA) == "tf32"
        with precision("fp32"):
            assert launch_mod.dot_precision(torch.float32, CUDA) == "ieee"
        assert precision_flags.fp32_precision == "tf32"
    assert precision_flags.fp32_precision == "ieee"


class _FakeCudaDevice:
    """Stands in for ``torch.cuda.device``: records the device made current, and restores the previous one."""

    current = 0

    def __init__(self, device):
        self.index = device.index

    def __enter__(self):
        self.saved, _FakeCudaDevice.current = _FakeCudaDevice.current, self.index

    def __exit__(self, *exc):
        _FakeCudaDevice.current = self.saved


def test_on_device_switches_to_the_tensors_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: _FakeCudaDevice.current)
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    seen = []
    kernel = type("K", (), {"__getitem__": lambda self, grid: lambda *a, **k: seen.append(_FakeCudaDevice.current)})
    launch_mod.launch(kernel(), (1,), torch.device("cuda", 1))
    launch_mod.launch(kernel(), (1,), torch.device("cuda", 0))
    launch_mod.launch(kernel(), (1,), CPU)
    assert seen == [1, 0, 0] and _FakeCudaDevice.current == 0
    assert isinstance(launch_mod.on_device(torch.device("cuda", 0)), contextlib.nullcontext)


ALL_KERNELS = gc.ALL_KERNELS


@pytest.mark.parametrize("kernel", list(ALL_KERNELS))
def test_every_launcher_launches_on_its_tensors_device(monkeypatch, kernel):
    """Each launcher goes through :func:`pyfused.kernels.launch.launch` with its tensors' device current."""
    state = dict(inside=None)

    @contextlib.contextmanager
    def fake_on_device(device):
        state["inside"] = device
        yield
        state["inside"] = None

    monkeypatch.setattr(launch_mod, "on_device", fake_on_device)
    module_name, kernel_name, _ = ALL_KERNELS[kernel]
    module = importlib.import_module(f"pyfused.kernels.{module_name}")
    calls = []
    recorder = type("R", (), {"__getitem__": lambda self, grid: lambda *a, **k: calls.append(state["inside"])})
    monkeypatch.setattr(module, kernel_name, recorder())
    gc._call_launcher(gc.Case(kernel, "sm_90", "fp32", True), module)
    assert calls == [torch.device("meta")]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_the_second_gpu(monkeypatch):
    """cuda:1 tensors while cuda:0 is current: the fused ops and a captured FusedTrainStep give the CPU results."""
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    torch.manual_seed(0)
    cpu = pyfused.FusedMLP(20, 16, 5)
    gpu = pyfused.FusedMLP(20, 16, 5).to("cuda:1")
    gpu.load_state_dict(cpu.state_dict())
    x, t = torch.randn(33, 20), torch.randint(0, 5, (33,))
    assert torch.cuda.current_device() == 0
    loss = gpu.nll_loss(x.to("cuda:1"), t.to("cuda:1"))
    torch.testing.assert_close(loss.cpu(), F.nll_loss(cpu(x), t), rtol=1e-4, atol=1e-5)
    opt, ref_opt = pyfused.FusedSGD(gpu.parameters(), lr=0.1, momentum=0.9), \
        torch.optim.SGD(cpu.parameters(), lr=0.1, momentum=0.9)
    step = pyfused.FusedTrainStep(gpu, opt)
    step(x.to("cuda:1"), t.to("cuda:1"))
    step.capture(x.to("cuda:1"), t.to("cuda:1"))
    for _ in range(3):
        step(x.to("cuda:1"), t.to("cuda:1"))
    for _ in range(4):
        F.nll_loss(cpu(x), t).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for ours, theirs in zip(gpu.parameters(), cpu.parameters()):
        torch.testing.assert_close(ours.cpu(), theirs, rtol=1e-4, atol=1e-5)
