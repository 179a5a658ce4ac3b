"""Bad input: clear errors naming the argument, raised before anything runs, of PyTorch's types."""
import pytest
import torch

import pyfused

from test_functional import make
from utils import DEVICE


@pytest.fixture
def args():
    x, w1, b1, w2, b2, target = make((4,), 6, 5, 3, True, device="cpu")
    return dict(x=x, w1=w1, b1=b1, w2=w2, b2=b2), target


CASES = [
    ("x", lambda a: a["x"].long(), TypeError, "x must be a floating-point"),
    ("x", lambda a: a["x"][:, :5], ValueError, r"x must have shape \(\*, 6\)"),
    ("x", lambda a: a["x"].double(), TypeError, None),
    ("w1", lambda a: a["w1"][0], ValueError, "w1 must be 2-D"),
    ("w1", lambda a: a["w1"].double(), TypeError, "w1 must have x's dtype"),
    ("w2", lambda a: a["w2"][:, :4], ValueError, r"w2 must have shape \(out, 5\)"),
    ("b1", lambda a: a["b1"][:4], ValueError, r"b1 must have shape \(5,\)"),
    ("b2", lambda a: a["b2"].double(), TypeError, "b2 must have x's dtype"),
    ("b2", lambda a: a["b2"].to("meta"), ValueError, "b2 must be on x's device"),
    ("w2", lambda a: "not a tensor", TypeError, "w2 must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,bad,error,match", CASES)
def test_bad_mlp_arguments(backend, args, name, bad, error, match):
    kw, target = args
    kw = dict(kw, **{name: bad(kw)})
    with pytest.raises(error, match=match):
        pyfused.fused_mlp(**kw)
    with pytest.raises(error, match=match):
        pyfused.fused_mlp_nll(**kw, target=target)
    if isinstance(kw[name], torch.Tensor):
        with pytest.raises(RuntimeError):  # also the type PyTorch's own ops raise for a bad tensor
            pyfused.fused_mlp(**kw)


@pytest.mark.parametrize("target,kwargs,error,match", [
    (lambda t: t.float(), {}, TypeError, "target must hold integer"),
    (lambda t: t[:3], {}, ValueError, r"target must have shape \(4,\)"),
    (lambda t: t, dict(reduction="avg"), ValueError, "reduction must be one of"),
    (lambda t: t, dict(ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (lambda t: t, dict(activation="gelu"), ValueError, r"activation must be one of \('relu', 'sigmoid'\), got 'gelu'"),
])
def test_bad_loss_arguments(backend, args, target, kwargs, error, match):
    kw, t = args
    with pytest.raises(error, match=match):
        pyfused.fused_mlp_nll(**kw, target=target(t), **kwargs)


@pytest.mark.parametrize("value", [3, -1, 100])
def test_cpu_target_out_of_range_is_index_error(backend, args, value):
    kw, target = args
    target[1] = value
    with pytest.raises(IndexError, match=f"target {value} is out of bounds"):
        pyfused.fused_mlp_nll(**kw, target=target)


def test_bad_activation(args):
    kw, _ = args
    with pytest.raises(ValueError, match="activation must be one of"):
        pyfused.fused_mlp(**kw, activation="Sigmoid")
    with pytest.raises(TypeError, match="activation must be a str"):
        pyfused.FusedMLP(3, 4, 2, activation=None)


@pytest.mark.parametrize("dtype,limit", [(torch.float16, 1024), (torch.bfloat16, 1024), (torch.float32, 512),
                                         (torch.float64, 256)])
def test_wider_nets_than_the_kernels_take_go_to_the_torch_path(monkeypatch, dtype, limit):
    """``auto`` on CUDA: the kernels up to ``max_out`` outputs, the torch path past it (decided from the device
    object: no GPU needed); ``triton`` keeps the kernels, which refuse before any launch."""
    from pyfused import backend
    from pyfused.kernels.rows import max_out

    assert max_out(dtype) == limit
    cuda = torch.device("cuda")
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    assert backend.use_triton(cuda, dtype, limit) and not backend.use_triton(cuda, dtype, limit + 1)
    assert backend.engine(cuda, dtype, limit + 1) is backend.engine(torch.device("cpu"), dtype)  # the twins
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    assert backend.use_triton(cuda, dtype, limit + 1)


def test_the_kernels_refuse_a_net_wider_than_they_take(monkeypatch):
    """``triton``: ValueError before any launch; ``auto``: the torch path (on CUDA because of the width)."""
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    x, w1, b1 = (torch.randn(*s, device=DEVICE) for s in ((4, 6), (5, 6), (5,)))
    w2, b2 = torch.randn(513, 5, device=DEVICE), torch.randn(513, device=DEVICE)
    with pytest.raises(ValueError, match=r"out_features <= 512 in torch.float32, got 513"):
        pyfused.fused_mlp(x, w1, b1, w2, b2)
    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    torch.testing.assert_close(pyfused.fused_mlp(x, w1, b1, w2, b2),
                               torch.log_softmax(torch.relu(x @ w1.t() + b1) @ w2.t() + b2, -1))


def test_every_fused_call_asks_the_backend_with_its_output_width(monkeypatch):
    """The forward and the backward of the ops, the modules and FusedTrainStep pick their engine for the net's
    output width (the same in both: their saved tensors differ between engines)."""
    from pyfused import backend

    widths, real = [], backend.use_triton

    def spy(device, dtype=None, n_out=None):
        widths.append(n_out)
        return real(device, dtype, n_out)

    monkeypatch.setattr(backend, "use_triton", spy)
    x, w1, b1, w2, b2, target = make((4,), 6, 5, 3, True, device=DEVICE)
    pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target).backward()
    pyfused.fused_mlp(x, w1, b1, w2, b2).sum().backward()
    with torch.no_grad():
        pyfused.fused_mlp(x, w1, b1, w2, b2)
    model = pyfused.FusedMLP(6, 5, 3, device=DEVICE)
    model.nll_loss(x.detach(), target).backward()
    step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), lr=0.1))
    step(x.detach(), target)
    assert widths and set(widths) == {3}, widths
