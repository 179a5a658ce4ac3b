"""Heads and losses on both backends against float64 PyTorch: logits (``log_softmax=False``), cross-entropy on the
logits, MSE (all reductions, targets of the logits' shape), per-layer bias, and the module methods that fit (or
refuse) each head. Tolerances: tests/utils.py TOL (float32 vs float64: 1e-4)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfused
from pyfused import checks

from utils import DEVICE, TOL, eager_loss, eager_twin

SHAPES = [((37,), 29, 19, 7), ((2, 5), 12, 9, 3), ((0,), 8, 16, 5)]


def make(batch, n_in, hidden, out, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = lambda v: v.to(DEVICE, torch.float32).requires_grad_()  # noqa: E731
    x, w1, w2 = t(r(*batch, n_in)), t(r(hidden, n_in) / n_in ** 0.5), t(r(out, hidden) / hidden ** 0.5)
    b1, b2 = (t(r(hidden)), t(r(out))) if bias else (None, None)
    classes = torch.randint(0, out, batch, generator=g)
    if classes.numel() > 2:
        classes.view(-1)[::4] = -100
    return [x, w1, b1, w2, b2], classes.to(DEVICE), r(*batch, out).to(DEVICE, torch.float32)


def logits64(x, w1, b1, w2, b2, activation="relu"):
    c = lambda t: None if t is None else t.double()  # noqa: E731
    act = F.relu if activation == "relu" else torch.sigmoid
    return F.linear(act(F.linear(c(x), c(w1), c(b1))), c(w2), c(b2))


def check_value_and_grads(ours, ref, tensors):
    assert ours.shape == ref.shape and ours.dtype == tensors[0].dtype
    torch.testing.assert_close(ours.double(), ref, equal_nan=True, **TOL[torch.float32])
    live = [t for t in tensors if t is not None]
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(ours, live, grad.to(ours.dtype)), torch.autograd.grad(ref, live, grad)):
        torch.testing.assert_close(a.double(), b.double(), equal_nan=True, **TOL[torch.float32])


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_logits_head(backend, shape, bias, activation):
    tensors, _, _ = make(*shape, bias)
    check_value_and_grads(pyfused.fused_mlp(*tensors, activation, log_softmax=False), logits64(*tensors, activation),
                          tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cross_entropy_on_the_logits(backend, shape, bias, reduction):
    tensors, classes, _ = make(*shape, bias)
    loss = pyfused.fused_mlp_cross_entropy(*tensors, classes, reduction=reduction)
    ref = F.cross_entropy(logits64(*tensors).reshape(-1, shape[3]), classes.reshape(-1), reduction=reduction)
    check_value_and_grads(loss, ref.view(classes.shape) if reduction == "none" else ref, tensors)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_mse(backend, shape, bias, activation, reduction):
    tensors, _, target = make(*shape, bias)
    loss = pyfused.fused_mlp_mse(*tensors, target, reduction=reduction, activation=activation)
    ref = F.mse_loss(logits64(*tensors, activation), target.double(), reduction=reduction)
    if shape[0] == (0,) and reduction == "mean":  # the mean of nothing: NaN, as in torch
        assert torch.isnan(loss) and torch.isnan(ref)
        return
    check_value_and_grads(loss, ref, tensors)


@pytest.mark.parametrize("loss", ["nll", "cross_entropy", "mse"])
def test_deep_per_layer_bias_and_every_head(backend, loss):
    """The course's small net: 20 → 13 → 8 → 3, ReLU then sigmoid, bias only on the last layer."""
    torch.manual_seed(0)
    model = pyfused.DeepFusedMLP(20, 13, 8, 3, activation=("relu", "sigmoid"), bias=(False, False, True),
                                 device=DEVICE, log_softmax=loss == "nll")
    assert [n for n, _ in model.named_parameters()] == ["fc1.weight", "fc2.weight", "fc3.weight", "fc3.bias"]
    ref = eager_twin(model, torch.float64)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(29, 20, generator=g).to(DEVICE).requires_grad_()
    target = torch.randn(29, 3, generator=g).to(DEVICE) if loss == "mse" else \
        torch.randint(0, 3, (29,), generator=g).to(DEVICE)
    method = {"nll": model.nll_loss, "cross_entropy": model.cross_entropy, "mse": model.mse_loss}[loss]
    for reduction in ("mean", "sum", "none"):
        ours = method(x, target, reduction=reduction)
        x64 = x.detach().double().requires_grad_()
        theirs = eager_loss(loss, ref(x64), target.double() if loss == "mse" else target, reduction)
        torch.testing.assert_close(ours.double(), theirs, **TOL[torch.float32])
        grad = torch.rand_like(theirs)
        for a, b in zip(torch.autograd.grad(ours, [x, *model.parameters()], grad.float()),
                        torch.autograd.grad(theirs, [x64, *ref.parameters()], grad)):
            torch.testing.assert_close(a.double(), b, **TOL[torch.float32])
    y = model(x)
    torch.testing.assert_close(y.double(), ref(x.detach().double()), **TOL[torch.float32])


def test_fused_mlp_with_one_bias_from_linear(backend):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(6, 5, bias=False), nn.Linear(5, 3)
    model = pyfused.FusedMLP.from_linear(fc1, fc2, log_softmax=False)
    x, t = torch.randn(9, 6, device=DEVICE), torch.randn(9, 3, device=DEVICE)
    model.to(DEVICE)
    ref = F.mse_loss(model.fc2(F.relu(model.fc1(x))), t)
    torch.testing.assert_close(model.mse_loss(x, t), ref, **TOL[torch.float32])
    assert "log_softmax=False" in repr(model)


def test_methods_that_do_not_fit_the_head_are_refused():
    logp, logits = pyfused.FusedMLP(4, 5, 3), pyfused.FusedMLP(4, 5, 3, log_softmax=False)
    deep = pyfused.DeepFusedMLP(4, 5, 6, 3, log_softmax=False)
    x, t = torch.randn(2, 4), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"FusedMLP.cross_entropy does not fit .* log-probabilities .* nll_loss"):
        logp.cross_entropy(x, t)
    with pytest.raises(ValueError, match="FusedMLP.mse_loss does not fit"):
        logp.mse_loss(x, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"FusedMLP.nll_loss does not fit .* logits .* cross_entropy or mse_loss"):
        logits.nll_loss(x, t)
    with pytest.raises(ValueError, match="DeepFusedMLP.nll_loss does not fit"):
        deep.nll_loss(x, t)
    with pytest.raises(TypeError, match="log_softmax must be a bool"):
        pyfused.FusedMLP(4, 5, 3, log_softmax="yes")


def test_mse_target_errors():
    model = pyfused.FusedMLP(4, 5, 3, log_softmax=False)
    x = torch.randn(2, 4)
    with pytest.raises(checks.DTypeError, match="target must be a floating-point tensor"):
        model.mse_loss(x, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(checks.DTypeError, match="target must have x's dtype"):
        model.mse_loss(x, torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(checks.ShapeError, match=r"target must have the logits' shape \(2, 3\)"):
        model.mse_loss(x, torch.zeros(2))
    with pytest.raises(ValueError, match="reduction must be one of"):
        model.mse_loss(x, torch.zeros(2, 3), reduction="max")
    with pytest.raises(RuntimeError, match="does not differentiate its target"):
        model.mse_loss(x, torch.zeros(2, 3, requires_grad=True))


def test_deep_bias_argument_errors():
    with pytest.raises(ValueError, match=r"bias must be one bool or one per layer \(3\)"):
        pyfused.DeepFusedMLP(4, 5, 6, 3, bias=(True, False))
    with pytest.raises(ValueError, match="needs a target"):
        pyfused.fused_deep_mlp(torch.randn(2, 4), [torch.randn(3, 4), torch.randn(2, 3)], [None, None], ["relu"],
                               loss="mse")
    with pytest.raises(ValueError, match="loss must be one of"):
        pyfused.fused_deep_mlp(torch.randn(2, 4), [torch.randn(3, 4), torch.randn(2, 3)], [None, None], ["relu"],
                               torch.tensor([0, 1]), loss="hinge")
