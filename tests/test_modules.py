"""FusedMLP: nn.Linear's init, names and state_dict; training trajectory; torch.compile; opcheck."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfused

from conftest import DEVICE


def seed_pair(in_f, hidden, out, bias, seed=420):
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(in_f, hidden, bias), nn.Linear(hidden, out, bias)
    return fc1, fc2


@pytest.mark.parametrize("bias", [True, False])
def test_init_names_and_state_dict_equal_the_linear_pair(bias):
    fc1, fc2 = seed_pair(784, 128, 10, bias)
    torch.manual_seed(420)
    model = pyfused.FusedMLP(784, 128, 10, bias=bias)
    ref = nn.Sequential()
    ref.fc1, ref.fc2 = fc1, fc2
    ours, theirs = model.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs) == (["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] if bias
                                          else ["fc1.weight", "fc2.weight"])
    for k in ours:
        assert torch.equal(ours[k], theirs[k])
    assert [n for n, _ in model.named_parameters()] == list(ours)
    model.load_state_dict(theirs)


def test_device_and_dtype_follow_arguments():
    model = pyfused.FusedMLP(3, 4, 2, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())


def test_from_linear_shares_parameters(backend):
    fc1, fc2 = seed_pair(6, 5, 3, True)
    model = pyfused.FusedMLP.from_linear(fc1, fc2)
    assert model.fc1.weight is fc1.weight and model.fc2.bias is fc2.bias
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), F.log_softmax(fc2(F.relu(fc1(x))), -1), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="fc2.in_features"):
        pyfused.FusedMLP.from_linear(fc1, nn.Linear(4, 3))
    with pytest.raises(TypeError, match="fc1 must be an nn.Linear"):
        pyfused.FusedMLP.from_linear(nn.ReLU(), fc2)
    sig = pyfused.FusedMLP.from_linear(fc1, fc2, activation="sigmoid")
    torch.testing.assert_close(sig(x), F.log_softmax(fc2(torch.sigmoid(fc1(x))), -1), atol=1e-5, rtol=1e-5)
    assert "activation='sigmoid'" in repr(sig) and list(sig.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_momentum_sgd_trajectory_matches_nn_sequential(backend, activation):
    """50 steps of SGD(momentum=0.9) on FusedMLP.nll_loss vs nn.Sequential + F.nll_loss (float32)."""
    in_f, hidden, out, batch = (784, 128, 10, 128) if backend == "torch" or DEVICE == "cuda" else (40, 24, 10, 32)
    fc1, fc2 = seed_pair(in_f, hidden, out, False)
    act = nn.ReLU() if activation == "relu" else nn.Sigmoid()
    ref = nn.Sequential(fc1, act, fc2, nn.LogSoftmax(dim=1)).to(DEVICE)
    model = pyfused.FusedMLP(in_f, hidden, out, bias=False, device=DEVICE, activation=activation)
    model.load_state_dict({"fc1.weight": fc1.weight, "fc2.weight": fc2.weight})
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.15, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.15, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x = torch.rand(batch, in_f, generator=g).to(DEVICE)
        t = torch.randint(0, out, (batch,), generator=g).to(DEVICE)
        for m, o, loss_fn in ((ref, opt_ref, lambda: F.nll_loss(ref(x), t)), (model, opt, lambda: model.nll_loss(x, t))):
            loss = loss_fn()
            loss.backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-4, rtol=2e-4)


def test_torch_compile_fullgraph_forward_backward(backend):
    """The compiled loss (fullgraph: no graph breaks; AOTAutograd compiles its backward) and its gradients equal
    eager ones. aot_eager keeps CI fast; the inductor variant is in the slow set."""
    model = pyfused.FusedMLP(12, 16, 5).to(DEVICE)
    x, t = torch.randn(9, 12, device=DEVICE), torch.randint(0, 5, (9,), device=DEVICE)

    def loss_fn(x, t):
        return model.nll_loss(x, t) + model(x).exp().sum() * 0.01

    compiled_fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (loss_fn, compiled_fn):
        loss = fn(x, t)
        results.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor(backend):
    model = pyfused.FusedMLP(12, 16, 5).to(DEVICE)
    x, t = torch.randn(9, 12, device=DEVICE), torch.randint(0, 5, (9,), device=DEVICE)
    eager = model.nll_loss(x, t)
    compiled = torch.compile(lambda x, t: model.nll_loss(x, t), fullgraph=True)(x, t)
    torch.testing.assert_close(compiled, eager)


OPCHECK_HEADS = [("log_softmax", "none"), ("logits", "none"), ("log_softmax", "nll"), ("logits", "cross_entropy"),
                  ("logits", "mse")]


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(backend, bias):
    """pyfused::mlp (and its backward op) for every head and loss, both activations, two layers."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()  # noqa: E731
    x, weights = r(7, 6), [r(5, 6), r(3, 5)]
    biases = [r(5), r(3)] if bias else [torch.empty(0, device=DEVICE)] * 2
    t = torch.randint(0, 3, (7,), generator=g).to(DEVICE)
    t[2] = -100
    t_mse = torch.randn(7, 3, generator=g).to(DEVICE)
    for activation in ("relu", "sigmoid"):
        for head, loss in OPCHECK_HEADS:
            for reduction in ("mean", "sum", "none") if loss != "none" else ("mean",):
                target = None if loss == "none" else t_mse if loss == "mse" else t
                torch.library.opcheck(torch.ops.pyfused.mlp.default,
                                      (x, target, weights, biases, activation, head, loss, reduction, -100))
