"""torch.func over the fused ops (grad, grad_and_value, functional_call, vmap, per-sample gradients) against
torch.func over the unfused graph, on both backends, in float64; and double backward's clear error."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, grad_and_value, vmap

import pyfused
from pyfused.kernels.launch import observe
from tests.utils import DEVICE, TOL

TOL64 = TOL[torch.float64]
ARGS = (0, 1, 2, 3, 4)


def _net(rows=5, n_in=7, hidden=6, n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE)  # noqa: E731
    target = torch.randint(0, n_out, (rows,), generator=g).to(DEVICE)
    target[1] = -100
    return make(rows, n_in), make(hidden, n_in), make(hidden), make(n_out, hidden), make(n_out), target


def eager_mlp(x, w1, b1, w2, b2, log_softmax=True):
    z = F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)
    return F.log_softmax(z, -1) if log_softmax else z


def eager_loss(kind):
    def loss(x, w1, b1, w2, b2, target, reduction="mean"):
        if kind == "mse":
            return F.mse_loss(eager_mlp(x, w1, b1, w2, b2, False), target, reduction=reduction)
        if kind == "nll":
            return F.nll_loss(eager_mlp(x, w1, b1, w2, b2), target, reduction=reduction)
        return F.cross_entropy(eager_mlp(x, w1, b1, w2, b2, False), target, reduction=reduction)
    return loss


FUSED = {"nll": pyfused.fused_mlp_nll, "cross_entropy": pyfused.fused_mlp_cross_entropy, "mse": pyfused.fused_mlp_mse}


def _target(kind, target, n_out=3):
    if kind != "mse":
        return target
    g = torch.Generator().manual_seed(3)
    return torch.randn(target.shape[0], n_out, generator=g, dtype=torch.float64).to(DEVICE)


def _launches(fn):
    seen = []
    with observe(seen.append):
        out = fn()
    return out, len(seen)


@pytest.mark.parametrize("kind", ["nll", "cross_entropy", "mse"])
def test_grad_and_grad_and_value_match_the_unfused_graph(backend, kind):
    x, w1, b1, w2, b2, target = _net()
    target = _target(kind, target)
    ours = grad_and_value(FUSED[kind], argnums=ARGS)(x, w1, b1, w2, b2, target)
    theirs = grad_and_value(eager_loss(kind), argnums=ARGS)(x, w1, b1, w2, b2, target)
    torch.testing.assert_close(ours, theirs, **TOL64)
    torch.testing.assert_close(grad(FUSED[kind], argnums=1)(x, w1, b1, w2, b2, target), theirs[0][1], **TOL64)


def test_functional_call_of_a_fused_module(backend):
    x, *_, target = _net()
    model = pyfused.FusedMLP(7, 6, 3).double().to(DEVICE)
    ref = torch.nn.Sequential(torch.nn.Linear(7, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3), torch.nn.LogSoftmax(-1))
    ref = ref.double().to(DEVICE)
    ref.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in model.state_dict().items()})
    params = {k: v.detach() for k, v in model.named_parameters()}
    ref_params = {k.replace("fc1", "0").replace("fc2", "2"): v for k, v in params.items()}
    ours = grad(lambda p: F.nll_loss(functional_call(model, p, (x,)), target))(params)
    theirs = grad(lambda p: F.nll_loss(functional_call(ref, p, (x,)), target))(ref_params)
    for name, g in ours.items():
        torch.testing.assert_close(g, theirs[name.replace("fc1", "0").replace("fc2", "2")], **TOL64)


@pytest.mark.parametrize("log_softmax", [True, False])
def test_vmap_over_x_folds_the_batch_into_the_rows(backend, log_softmax):
    x, w1, b1, w2, b2, _ = _net(rows=12)
    xs = x.view(3, 4, 7)
    dims = (0, None, None, None, None)
    fused = lambda *a: pyfused.fused_mlp(*a, log_softmax=log_softmax)  # noqa: E731
    ours, launches = _launches(lambda: vmap(fused, in_dims=dims)(xs, w1, b1, w2, b2))
    theirs = vmap(lambda *a: eager_mlp(*a, log_softmax), in_dims=dims)(xs, w1, b1, w2, b2)
    torch.testing.assert_close(ours, theirs, **TOL64)
    if backend == "triton":
        assert launches == 1  # one forward for the whole batch
    # the batch dimension elsewhere than in front
    ours = vmap(fused, in_dims=(1, None, None, None, None))(xs.transpose(0, 1), w1, b1, w2, b2)
    torch.testing.assert_close(ours, theirs, **TOL64)


def test_vmap_over_the_weights_runs_an_ensemble(backend):
    x, w1, b1, w2, b2, _ = _net()
    w1s = torch.stack([w1, 2 * w1, -w1])
    b2s = torch.stack([b2, b2 + 1, b2 - 1])
    dims = (None, 0, None, None, 0)
    ours = vmap(pyfused.fused_mlp, in_dims=dims)(x, w1s, b1, w2, b2s)
    torch.testing.assert_close(ours, vmap(eager_mlp, in_dims=dims)(x, w1s, b1, w2, b2s), **TOL64)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", ["nll", "mse"])
def test_vmap_of_a_loss_per_batch(backend, kind, reduction):
    x, w1, b1, w2, b2, target = _net(rows=12)
    target = _target(kind, target)
    xs, ts = x.view(3, 4, 7), target.view(3, 4, *target.shape[1:])
    dims = (0, None, None, None, None, 0)
    ours = vmap(lambda *a: FUSED[kind](*a, reduction=reduction), in_dims=dims)(xs, w1, b1, w2, b2, ts)
    theirs = vmap(lambda *a: eager_loss(kind)(*a, reduction=reduction), in_dims=dims)(xs, w1, b1, w2, b2, ts)
    torch.testing.assert_close(ours, theirs, **TOL64)


@pytest.mark.parametrize("kind", ["nll", "cross_entropy", "mse"])
def test_per_sample_gradients(backend, kind):
    """vmap(grad(loss)) over one-row batches: the classic per-sample-gradient recipe."""
    x, w1, b1, w2, b2, target = _net()
    target = _target(kind, target)
    xs, ts = x.unsqueeze(1), target.unsqueeze(1)
    dims = (0, None, None, None, None, 0)
    ours = vmap(grad(FUSED[kind], argnums=(1, 2, 3, 4)), in_dims=dims)(xs, w1, b1, w2, b2, ts)
    theirs = vmap(grad(eager_loss(kind), argnums=(1, 2, 3, 4)), in_dims=dims)(xs, w1, b1, w2, b2, ts)
    torch.testing.assert_close(ours, theirs, **TOL64)


def test_the_deep_op_under_grad_and_vmap(backend):
    x, w1, b1, w2, b2, target = _net(rows=6)
    w0 = torch.randn(7, 7, dtype=torch.float64, device=DEVICE)

    def ours(x, w0, w1):
        return pyfused.fused_deep_mlp(x, (w0, w1, w2), (None, b1, b2), ("sigmoid", "relu"), target)

    def theirs(x, w0, w1):
        return F.nll_loss(eager_mlp(torch.sigmoid(F.linear(x, w0)), w1, b1, w2, b2), target)

    torch.testing.assert_close(grad(ours, argnums=(0, 1, 2))(x, w0, w1), grad(theirs, argnums=(0, 1, 2))(x, w0, w1),
                               **TOL64)
    per_row = lambda f: vmap(lambda xi: f(xi.expand(6, 7), w0, w1))(x)  # noqa: E731
    torch.testing.assert_close(per_row(ours), per_row(theirs), **TOL64)


@pytest.mark.parametrize("how", ["create_graph", "func"])
def test_double_backward_on_the_kernels_raises_a_clear_error_and_works_on_the_torch_path(backend, how):
    x, w1, b1, w2, b2, target = _net()
    x.requires_grad_()
    if backend == "torch":  # eager's own ops: a gradient of a gradient, as torch gives it
        def penalty(f):
            return lambda w: grad(f, argnums=1)(x, w, b1, w2, b2, target).square().sum()
        torch.testing.assert_close(grad(penalty(pyfused.fused_mlp_nll))(w1),
                                   grad(penalty(eager_loss("nll")))(w1), **TOL64)
        return
    if how == "create_graph":
        (gx,) = torch.autograd.grad(pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target), x, create_graph=True)
        with pytest.raises(RuntimeError, match="pyfused.*double backward.*unfuse"):
            gx.sum().backward()
    else:
        with pytest.raises(RuntimeError, match="pyfused.*double backward"):
            grad(lambda w: grad(pyfused.fused_mlp_nll, argnums=1)(x, w, b1, w2, b2, target).sum())(w1)


def test_first_order_create_graph_still_gives_the_gradients(backend):
    """create_graph=True itself works (a gradient penalty then fails clearly, above); the values are right."""
    x, w1, b1, w2, b2, target = _net()
    w = w1.clone().requires_grad_()
    (ours,) = torch.autograd.grad(pyfused.fused_mlp_nll(x, w, b1, w2, b2, target), w, create_graph=True)
    (theirs,) = torch.autograd.grad(eager_loss("nll")(x, w, b1, w2, b2, target), w)
    torch.testing.assert_close(ours, theirs, **TOL64)
