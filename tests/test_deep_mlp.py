"""DeepFusedMLP / fused_deep_mlp: MLPs of any depth against a float64 nn.Sequential, on every backend.

The course's small net (20 → 13 → 8 → 3, ReLU then sigmoid) and a 5-layer one; outputs, NLL losses and the
gradients of x and of every weight and bias. Tolerances as in test_functional.py (float32 vs float64:
atol=rtol=1e-4).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfused

from conftest import DEVICE

TOL = dict(atol=1e-4, rtol=1e-4)
NETS = {  # features, activations
    "course-20-13-8-3": ((20, 13, 8, 3), ("relu", "sigmoid")),
    "five-layers": ((12, 17, 9, 33, 5), ("sigmoid", "relu", "relu")),
}


def make(name, bias, seed=0):
    """(DeepFusedMLP on DEVICE, float64 nn.Sequential copy of its layers with the activations)."""
    features, activations = NETS[name]
    torch.manual_seed(seed)
    model = pyfused.DeepFusedMLP(*features, activation=activations, bias=bias, device=DEVICE)
    layers = []
    for fc, act in zip(model.linears(), activations + (None,)):
        layers += [fc] if act is None else [fc, nn.ReLU() if act == "relu" else nn.Sigmoid()]
    return model, copy.deepcopy(nn.Sequential(*layers)).double()


def data(n_in, n_out, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n_in, generator=g).to(DEVICE)
    target = torch.randint(0, n_out, batch, generator=g).to(DEVICE)
    if target.numel() > 2:
        target.view(-1)[::4] = -100
    return x, target


def check_grads(out, ref_out, model, ref, x, x64, grad=None):
    ours = torch.autograd.grad(out, [x, *model.parameters()], grad)
    theirs = torch.autograd.grad(ref_out, [x64, *ref.parameters()], None if grad is None else grad.double())
    names = ["x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, ours, theirs):
        torch.testing.assert_close(a.double(), b, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [(37,), (2, 5), (0,)], ids=str)
@pytest.mark.parametrize("name", list(NETS))
def test_log_probabilities_and_gradients(backend, name, batch, bias):
    model, ref = make(name, bias)
    x, _ = data(NETS[name][0][0], NETS[name][0][-1], batch)
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, ref_y = model(x), F.log_softmax(ref(x64), dim=-1)
    assert y.shape == ref_y.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), ref_y, **TOL)
    check_grads(y, ref_y, model, ref, x, x64, torch.randn_like(y))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", list(NETS))
def test_nll_loss_and_gradients(backend, name, reduction):
    model, ref = make(name, True)
    x, target = data(NETS[name][0][0], NETS[name][0][-1], (29,))
    x.requires_grad_()
    x64 = x.detach().double().requires_grad_()
    loss = model.nll_loss(x, target, reduction=reduction)
    ref_loss = F.nll_loss(F.log_softmax(ref(x64), dim=-1), target, reduction=reduction)
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, **TOL)
    check_grads(loss, ref_loss, model, ref, x, x64, torch.rand_like(loss))


def test_frozen_layers_get_no_gradient(backend):
    """Only the head trains (nothing before it needs dx), then only the first layer does."""
    model, ref = make("five-layers", True)
    x, target = data(12, 5, (9,))
    for trainable in (["fc3", "fc4"], ["fc1"]):
        for n, p in model.named_parameters():
            p.requires_grad_(n.split(".")[0] in trainable)
        loss = model.nll_loss(x, target)
        loss.backward()
        ref.zero_grad()
        F.nll_loss(F.log_softmax(ref(x.double()), dim=-1), target).backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            if p.requires_grad:
                torch.testing.assert_close(p.grad.double(), q.grad, **TOL, msg=n)
                p.grad = None
            else:
                assert p.grad is None


def test_two_layers_are_a_fused_mlp(backend):
    torch.manual_seed(5)
    deep = pyfused.DeepFusedMLP(10, 16, 4, activation="sigmoid", device=DEVICE)
    torch.manual_seed(5)
    two = pyfused.FusedMLP(10, 16, 4, device=DEVICE, activation="sigmoid")
    assert list(deep.state_dict()) == list(two.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    x, target = data(10, 4, (7,))
    assert torch.equal(deep(x), two(x))
    assert torch.equal(deep.nll_loss(x, target), two.nll_loss(x, target))


def test_init_matches_the_nn_linear_layers():
    torch.manual_seed(420)
    model = pyfused.DeepFusedMLP(20, 13, 8, 3, activation=("relu", "sigmoid"))
    torch.manual_seed(420)
    linears = [nn.Linear(20, 13), nn.Linear(13, 8), nn.Linear(8, 3)]
    assert [n for n, _ in model.named_parameters()] == [f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")]
    for p, q in zip(model.parameters(), (t for fc in linears for t in fc.parameters())):
        assert torch.equal(p, q)
    assert "activations=('relu', 'sigmoid')" in repr(model)


def test_momentum_sgd_trajectory_matches_nn_sequential(backend):
    """30 steps of FusedSGD(momentum 0.9) on the course net against nn.Sequential + torch.optim.SGD (float32)."""
    model, ref = make("course-20-13-8-3", True)
    ref = ref.float()
    opt = pyfused.FusedSGD(model.parameters(), lr=0.3, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3, momentum=0.9)
    for step in range(30):
        x, target = data(20, 3, (32,), seed=step)
        for net, o, loss_fn in ((model, opt, lambda: model.nll_loss(x, target)),
                                (ref, ref_opt, lambda: F.nll_loss(F.log_softmax(ref(x), dim=-1), target))):
            loss_fn().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=2e-4, rtol=2e-4)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs in, at least one hidden and out features"):
        pyfused.DeepFusedMLP(4, 3)
    with pytest.raises(ValueError, match=r"one per hidden layer \(2\), got 3"):
        pyfused.DeepFusedMLP(4, 5, 6, 3, activation=("relu", "relu", "relu"))
    with pytest.raises(ValueError, match="activation must be one of"):
        pyfused.DeepFusedMLP(4, 5, 6, 3, activation=("relu", "tanh"))
    model = pyfused.DeepFusedMLP(4, 5, 6, 3)
    weights, biases = [fc.weight for fc in model.linears()], [fc.bias for fc in model.linears()]
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"w3 must have shape \(out, 6\) to match w2"):
        pyfused.fused_deep_mlp(x, [weights[0], weights[1], weights[2][:, :5]], biases, ("relu", "relu"))
    with pytest.raises(ValueError, match=r"b2 must have shape \(6,\)"):
        pyfused.fused_deep_mlp(x, weights, [biases[0], biases[1][:4], biases[2]], ("relu", "relu"))
    with pytest.raises(ValueError, match="L - 1 activations"):
        pyfused.fused_deep_mlp(x, weights, biases, ("relu",))
    with pytest.raises(IndexError, match="target 3 is out of bounds"):
        model.nll_loss(x, torch.tensor([0, 3]))


def test_opcheck(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 6, generator=g).to(DEVICE).requires_grad_()
    target = torch.tensor([0, 2, -100, 1], device=DEVICE)
    for bias in (True, (False, False, True)):
        model = pyfused.DeepFusedMLP(6, 7, 5, 3, activation=("relu", "sigmoid"), bias=bias, device=DEVICE)
        weights = [fc.weight for fc in model.linears()]
        biases = [torch.empty(0, device=DEVICE) if fc.bias is None else fc.bias for fc in model.linears()]
        for t, reduction in ((None, "mean"), (target, "mean"), (target, "sum"), (target, "none")):
            torch.library.opcheck(torch.ops.pyfused.mlp.default,
                                  (x, t, weights, biases, "relu,sigmoid", "log_softmax",
                                   "none" if t is None else "nll", reduction, -100))


def test_torch_compile_fullgraph(backend):
    """Compiled (fullgraph, aot_eager) loss and gradients equal eager ones, also with the first layer frozen."""
    model, _ = make("course-20-13-8-3", True)
    x, target = data(20, 3, (9,))
    x.requires_grad_()

    def loss_fn(x, t):
        return model.nll_loss(x, t) + model(x).exp().sum() * 0.01

    compiled_fn = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for frozen in (False, True):
        model.fc1.requires_grad_(not frozen)
        trainable = [x] + [p for p in model.parameters() if p.requires_grad]
        results = []
        for fn in (loss_fn, compiled_fn):
            loss = fn(x, target)
            results.append([loss, *torch.autograd.grad(loss, trainable)])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b)
