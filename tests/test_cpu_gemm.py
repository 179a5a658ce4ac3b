"""pyfused.cpu_gemm: FusedTrainStep's torch-path GEMMs on oneDNN (float32, CPU, ``PYFUSED_BACKEND=auto``, from
``MIN_MACS`` multiply-adds) against float64 and against the twins they stand in for (eager's ATen ops); which GEMMs
take it; special values; module inference at the default threshold. The seed step at the default threshold is
tests/test_train_step.py::test_seed_shape_torch_path; the step's whole matrix (losses, optimizers, depth,
accumulation, keep_grad) runs on this path too: the ``onednn`` parameter of the ``step_backend`` fixture."""
import pytest
import torch

import pyfused
from pyfused import cpu_gemm, torch_ops

from utils import TOL

pytestmark = pytest.mark.skipif(not cpu_gemm.available(), reason="this torch build has no oneDNN")
F32 = TOL[torch.float32]


@pytest.fixture
def forced(monkeypatch):
    """oneDNN for every non-empty float32 GEMM (the default backend, threshold 1)."""
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1)


def spy(monkeypatch):
    """The oneDNN calls made (their operands' shapes), counted through cpu_gemm._abt."""
    calls, real = [], cpu_gemm._abt
    monkeypatch.setattr(cpu_gemm, "_abt", lambda a, b, bias=None: calls.append((a.shape, b.shape)) or real(a, b, bias))
    return calls


def test_which_gemms_take_onednn(monkeypatch):
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    seed = torch.randn(128, 784)
    assert cpu_gemm.takes(seed, 128)  # 12.8 M multiply-adds
    assert not cpu_gemm.takes(torch.randn(128, 128), 10)  # 164 k: MKL's
    assert not cpu_gemm.takes(seed.double(), 128) and not cpu_gemm.takes(seed.bfloat16(), 128)
    assert not cpu_gemm.takes(torch.empty(0, 784), 128)
    monkeypatch.setattr(cpu_gemm, "MIN_MACS", 1)
    assert cpu_gemm.takes(torch.randn(2, 3), 4) and not cpu_gemm.takes(torch.empty(0, 3), 4)
    monkeypatch.setenv("PYFUSED_BACKEND", "torch")  # eager's ATen ops, bit for bit
    assert not cpu_gemm.takes(seed, 128)
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    assert not cpu_gemm.takes(seed, 128)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False])
def test_layers_against_float64_and_the_twins(forced, monkeypatch, activation, bias):
    """Every GEMM of the step on ragged sizes, x column-major: act(x wᵀ + b), z, act'(d w), dᵀ a written and
    added; results new tensors except where they must land in ``out``."""
    calls = spy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(29, 37, generator=g).t().contiguous().t()
    w1, w2 = torch.randn(19, 37, generator=g), torch.randn(7, 19, generator=g)
    b1 = torch.randn(19, generator=g) if bias else None
    d2 = torch.randn(29, 7, generator=g)
    act64 = torch.relu if activation == "relu" else torch.sigmoid
    h = cpu_gemm.linear_act(x, w1, b1, activation, torch.empty(29, 19))
    h64 = act64(x.double() @ w1.double().t() + (0 if b1 is None else b1.double()))
    torch.testing.assert_close(h, h64.float(), **F32)
    torch.testing.assert_close(h, torch_ops.linear_act(x, w1, b1, activation), **F32)
    z = cpu_gemm.linear(h, w2, None, torch.empty(29, 7))
    torch.testing.assert_close(z, (h.double() @ w2.double().t()).float(), **F32)
    d1 = cpu_gemm.hidden_grad(d2, w2, h, activation, torch.empty(29, 19))
    torch.testing.assert_close(d1, torch_ops.hidden_grad(d2.double(), w2.double(), h.double(), activation).float(),
                               **F32)
    out = torch.full((19, 37), 0.5)
    assert cpu_gemm.weight_grad(d1, x, out, add=False) is out
    torch.testing.assert_close(out, (d1.double().t() @ x.double()).float(), **F32)
    assert cpu_gemm.weight_grad(d1, x, out, add=True) is out
    torch.testing.assert_close(out, (2 * d1.double().t() @ x.double()).float(), **F32)
    free = cpu_gemm.weight_grad(d1, x, out, add=False, kept=False)
    assert free is not out and free.shape == (19, 37)
    torch.testing.assert_close(free, (d1.double().t() @ x.double()).float(), **F32)
    assert len(calls) == 6  # each one on oneDNN


def test_strided_biases_and_onednn_switched_off(forced):
    """oneDNN reads a bias as if contiguous: a strided or expanded one is made contiguous first. With
    torch.backends.mkldnn switched off, eager's op runs."""
    x, w = torch.randn(8, 30), torch.randn(12, 30)
    for b in (torch.randn(24)[::2], torch.randn(1).expand(12)):
        torch.testing.assert_close(cpu_gemm.linear(x, w, b, None), torch_ops.linear(x, w, b), **F32)
    assert cpu_gemm.takes(x, 12)
    with torch.backends.mkldnn.flags(enabled=False):
        assert not cpu_gemm.takes(x, 12)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_nan_and_inf_propagate_as_in_eager(forced, activation):
    """oneDNN's fused relu maps NaN to 0; the activation runs as torch's own, so rows keep eager's NaN/Inf."""
    x, w, b = torch.randn(8, 30), torch.randn(12, 30), torch.randn(12)
    x[1, 3], x[2, 0], w[5, 7], b[9] = float("nan"), float("inf"), float("nan"), float("-inf")
    ours = cpu_gemm.linear_act(x, w, b, activation, torch.empty(8, 12))
    theirs = torch_ops.linear_act(x, w, b, activation)
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
    assert ours.isnan().any()
    finite = theirs.isfinite()
    torch.testing.assert_close(ours[finite], theirs[finite], **F32)


def test_module_inference_at_the_default_threshold(monkeypatch):
    """A FusedMLP's forward under no_grad (the torch path's own forward) takes oneDNN for x w₁ᵀ, within float32
    rounding of eager, NaN rows kept; with gradients the torch path records eager's own graph (no oneDNN)."""
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    calls = spy(monkeypatch)
    torch.manual_seed(0)
    model = pyfused.FusedMLP(784, 128, 10, bias=True)
    ref = torch.nn.Sequential(*[torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10),
                                torch.nn.LogSoftmax(-1)])
    ref.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in model.state_dict().items()})
    x = torch.rand(128, 784)
    x[5, 17] = float("nan")
    with torch.no_grad():
        ours, theirs = model(x), ref(x)
    assert len(calls) == 1 and calls[0] == ((128, 784), (128, 784))
    assert torch.equal(ours.isnan(), theirs.isnan()) and ours[5].isnan().all()
    torch.testing.assert_close(ours[~ours.isnan()], theirs[~theirs.isnan()], **F32)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0, equal_nan=True)  # with gradients: eager's bits
    assert len(calls) == 1
