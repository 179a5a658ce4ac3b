"""NaN and ±Inf in x, the weights or the biases propagate as in the unfused graph, row by row, for every
activation, head and loss, on both backends: the outputs (or per-row losses) and every gradient, NaN for NaN and
the same infinities (float64, so that only the special values differ from rounding)."""
import pytest
import torch
import torch.nn.functional as F

import pyfused
from tests.utils import DEVICE, TOL

SPECIAL = {"x": [(1, 2, float("nan")), (3, 0, float("inf")), (4, 5, float("-inf"))],
           "w1": [(2, 1, float("nan"))], "b1": [(3, float("inf"))], "w2": [(1, 4, float("-inf"))],
           "b2": [(0, float("nan"))]}
HEADS = ["log_softmax", "logits", "nll", "cross_entropy", "mse"]


def _tensors(where, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = dict(x=(6, 7), w1=(9, 7), b1=(9,), w2=(3, 9), b2=(3,))
    ts = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    for *index, value in SPECIAL[where]:
        ts[where][tuple(index)] = value
    target = torch.randint(0, 3, (6,), generator=g)
    mse_target = torch.randn(6, 3, generator=g, dtype=torch.float64)
    return {k: v.to(DEVICE).requires_grad_() for k, v in ts.items()}, target.to(DEVICE), mse_target.to(DEVICE)


def _run(fused: bool, head, activation, ts, target, mse_target, reduction):
    args = [ts[k] for k in ("x", "w1", "b1", "w2", "b2")]
    if fused:
        if head in ("log_softmax", "logits"):
            return pyfused.fused_mlp(*args, activation, log_softmax=head == "log_softmax")
        fn = {"nll": pyfused.fused_mlp_nll, "cross_entropy": pyfused.fused_mlp_cross_entropy,
              "mse": pyfused.fused_mlp_mse}[head]
        return fn(*args, mse_target if head == "mse" else target, reduction=reduction, activation=activation)
    x, w1, b1, w2, b2 = args
    act = F.relu if activation == "relu" else torch.sigmoid
    z = F.linear(act(F.linear(x, w1, b1)), w2, b2)
    if head == "log_softmax":
        return F.log_softmax(z, -1)
    if head == "logits":
        return z
    if head == "mse":
        return F.mse_loss(z, mse_target, reduction=reduction)
    fn = F.nll_loss if head == "nll" else F.cross_entropy
    return fn(F.log_softmax(z, -1) if head == "nll" else z, target, reduction=reduction)


@pytest.mark.parametrize("where", list(SPECIAL))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_special_values_propagate_as_in_the_unfused_graph(backend, activation, head, where):
    results = []
    for fused in (True, False):
        ts, target, mse_target = _tensors(where)
        out = _run(fused, head, activation, ts, target, mse_target, "none")
        # gradients of a finite upstream gradient, whatever the output holds
        grads = torch.autograd.grad(out, list(ts.values()), torch.linspace(-1, 1, out.numel(),
                                    dtype=out.dtype, device=DEVICE).view(out.shape))
        results.append((out, grads))
    (ours, our_grads), (theirs, their_grads) = results
    if where == "x":  # the special rows are special, the others untouched
        assert torch.isfinite(theirs[[0, 2, 5]]).all() and not torch.isfinite(theirs[[1, 3, 4]]).all()
    torch.testing.assert_close(ours, theirs, equal_nan=True, **TOL[torch.float64])
    for name, a, b in zip(("x", "w1", "b1", "w2", "b2"), our_grads, their_grads):
        torch.testing.assert_close(a, b, equal_nan=True, **TOL[torch.float64], msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("head", ["nll", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_nan_row_makes_the_reduced_loss_nan(backend, head, reduction):
    for fused in (True, False):
        ts, target, mse_target = _tensors("x")
        loss = _run(fused, head, "relu", ts, target, mse_target, reduction)
        assert torch.isnan(loss)


def test_the_train_step_loss_is_nan_for_a_nan_input(backend):
    """The fused step's loss is NaN for a NaN input, as the eager step's (a diverging run looks diverged)."""
    model = pyfused.FusedMLP(7, 9, 3).double().to(DEVICE)
    step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), lr=0.1))
    x = torch.randn(6, 7, dtype=torch.float64, device=DEVICE)
    x[2, 3] = float("nan")
    loss = step(x, torch.randint(0, 3, (6,), device=DEVICE))
    assert torch.isnan(loss)
    assert all(torch.isnan(p).any() for p in model.parameters())
