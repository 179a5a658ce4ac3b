"""fused_mlp / fused_mlp_nll against a float64 PyTorch reference, on every backend.

Tolerances (vs the float64 reference, outputs and gradients): float32 atol=rtol=1e-4 on CPU (IEEE dots);
TF32 2e-2; bfloat16/float16 follow the flash-attention rule |ours − ref| ≤ 2·|torch_same_dtype − ref| + atol.
"""
import types

import pytest
import torch
import torch.nn.functional as F

import pyfused
from pyfused import backend as backend_mod

from conftest import DEVICE

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10)}

# (batch shape, in, hidden, out): the seed shape, odd sizes, several row blocks, N=0, 3-D input, out=1.
SHAPES = [((128,), 784, 128, 10), ((13,), 29, 19, 7), ((70,), 40, 72, 33), ((0,), 8, 16, 5), ((2, 5), 12, 9, 3),
          ((6,), 5, 4, 1)]


def make(batch, n_in, hidden, out, bias, dtype=torch.float32, device=DEVICE, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    t = lambda v: v.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    x = t(r(*batch, n_in))
    w1, w2 = t(r(hidden, n_in) / n_in ** 0.5), t(r(out, hidden) / hidden ** 0.5)
    b1, b2 = (t(r(hidden) * 0.5), t(r(out) * 0.5)) if bias else (None, None)
    target = torch.randint(0, out, batch, generator=g).to(device)
    return x, w1, b1, w2, b2, target


ACT = {"relu": F.relu, "sigmoid": torch.sigmoid}
# every shape with relu; sigmoid on all but the (slow on the interpreter) seed shape
SHAPE_ACTS = [(shape, "relu") for shape in SHAPES] + [(shape, "sigmoid") for shape in SHAPES[1:]]


def reference(x, w1, b1, w2, b2, dtype=torch.float64, activation="relu"):
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return F.log_softmax(F.linear(ACT[activation](F.linear(c(x), c(w1), c(b1))), c(w2), c(b2)), dim=-1)


def inputs(x, w1, b1, w2, b2):
    return [t for t in (x, w1, b1, w2, b2) if t is not None]


def check(ours, ref, dtype=torch.float32):
    torch.testing.assert_close(ours.double(), ref.double(), equal_nan=True, **TOL[dtype])


def check_grads(out, ref_out, tensors):
    """The gradients of ``out`` and of the float64 ``ref_out`` for the same random output gradient."""
    grad = torch.randn_like(out)
    for ours, theirs in zip(torch.autograd.grad(out, tensors, grad),
                            torch.autograd.grad(ref_out, tensors, grad.double())):
        check(ours, theirs)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, activation", SHAPE_ACTS, ids=str)
def test_fused_mlp_matches_float64_reference(backend, shape, activation, bias):
    x, w1, b1, w2, b2, _ = make(*shape, bias)
    y = pyfused.fused_mlp(x, w1, b1, w2, b2, activation)
    ref = reference(x, w1, b1, w2, b2, activation=activation)
    assert y.shape == ref.shape and y.dtype == x.dtype
    check(y, ref)
    check_grads(y, ref, inputs(x, w1, b1, w2, b2))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape, activation", SHAPE_ACTS, ids=str)
def test_fused_mlp_nll_matches_float64_reference(backend, shape, activation, bias, reduction):
    x, w1, b1, w2, b2, target = make(*shape, bias)
    if target.numel() > 2:
        target.view(-1)[::3] = -100  # some ignored rows
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target, reduction=reduction, activation=activation)
    ref_y = reference(x, w1, b1, w2, b2, activation=activation)
    ref = F.nll_loss(ref_y.reshape(-1, w2.shape[0]), target.reshape(-1), reduction=reduction)
    if reduction == "none":
        ref = ref.view(target.shape)
    assert loss.shape == ref.shape and loss.dtype == x.dtype
    check(loss, ref)
    check_grads(loss, ref, inputs(x, w1, b1, w2, b2))


def test_mean_over_no_counted_rows_is_nan_with_zero_gradients(backend):
    x, w1, b1, w2, b2, target = make((5,), 6, 8, 3, True)
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, torch.full_like(target, -100))
    assert torch.isnan(loss)
    for g in torch.autograd.grad(loss, [x, w1, b1, w2, b2]):
        assert torch.equal(g, torch.zeros_like(g))


def test_custom_ignore_index_and_sum(backend):
    x, w1, b1, w2, b2, target = make((9,), 6, 8, 4, False)
    target[2] = 7
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target, reduction="sum", ignore_index=7)
    check(loss, F.nll_loss(reference(x, w1, b1, w2, b2), target, reduction="sum", ignore_index=7))


def test_non_contiguous_inputs(backend):
    x, w1, b1, w2, b2, target = make((11,), 20, 16, 6, True)
    xt = x.detach().t().contiguous().t().requires_grad_()  # column-major x
    w1t = w1.detach().t().contiguous().t().requires_grad_()
    w2s = torch.zeros(w2.shape[0], 2 * w2.shape[1], device=w2.device)
    w2s[:, ::2] = w2.detach()
    w2v = w2s[:, ::2].requires_grad_()  # strided columns
    b1v = torch.stack([b1.detach(), torch.full_like(b1, float("nan"))], 1)[:, 0].requires_grad_()  # strided bias
    assert not (xt.is_contiguous() or w1t.is_contiguous() or w2v.is_contiguous() or b1v.is_contiguous())
    targ = torch.stack([target, target], 1)[:, 0]  # strided target
    loss = pyfused.fused_mlp_nll(xt, w1t, b1v, w2v, b2, targ, reduction="sum")
    ref = F.nll_loss(reference(x, w1, b1, w2, b2), target, reduction="sum")
    check(loss, ref)
    with torch.no_grad():  # inference: the forward alone
        check(pyfused.fused_mlp(xt, w1t, b1v, w2v, b2.detach().expand(2, -1)[0]), reference(x, w1, b1, w2, b2))
    for ours, theirs in zip(torch.autograd.grad(loss, [xt, w1t, b1v, w2v, b2]),
                            torch.autograd.grad(ref, [x, w1, b1, w2, b2])):
        check(ours, theirs)


def test_only_some_inputs_need_grad(backend):
    x, w1, b1, w2, b2, target = make((7,), 10, 12, 5, True)
    x.requires_grad_(False)
    w1.requires_grad_(False)
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target)
    ref = F.nll_loss(reference(x, w1, b1, w2, b2), target)
    for ours, theirs in zip(torch.autograd.grad(loss, [b1, w2]), torch.autograd.grad(ref, [b1, w2])):
        check(ours, theirs)


def test_no_grad_inference_keeps_nothing(backend, monkeypatch):
    """Under no_grad the engine's forward runs without keeping anything (no activations stored for a backward),
    although a Function's needs_input_grad ignores no_grad; the results are those of the graph."""
    kept = []
    real = backend_mod.engine

    def spying_engine(device, dtype=None, n_out=None):
        engine = real(device, dtype, n_out)

        def forward(*args):
            kept.append(args[-1])
            return engine.forward(*args)
        return types.SimpleNamespace(forward=forward)

    monkeypatch.setattr(backend_mod, "engine", spying_engine)
    x, w1, b1, w2, b2, target = make((9,), 10, 12, 5, True)
    w0 = torch.randn(10, 10, dtype=x.dtype, device=x.device, requires_grad=True)
    with torch.no_grad():
        y = pyfused.fused_mlp(x, w1, b1, w2, b2)
        loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target)
        deep = pyfused.fused_deep_mlp(x, (w0, w1, w2), (None, b1, b2), ("relu", "relu"))
    assert kept == [False, False, False]
    assert not (y.requires_grad or loss.requires_grad or deep.requires_grad)
    check(y, reference(x, w1, b1, w2, b2))
    check(loss, F.nll_loss(reference(x, w1, b1, w2, b2), target))
    check(deep, reference(F.relu(x.double() @ w0.double().t()), w1, b1, w2, b2))


def test_deterministic_results(backend):
    x, w1, b1, w2, b2, target = make((40,), 24, 20, 6, True)
    runs = []
    for _ in range(2):
        loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target)
        runs.append([loss, *torch.autograd.grad(loss, [x, w1, b1, w2, b2])])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_gradcheck_torch_path_float64(monkeypatch, activation):
    monkeypatch.setenv("PYFUSED_BACKEND", "torch")
    x, w1, b1, w2, b2, target = make((4,), 5, 6, 3, True, dtype=torch.float64, device="cpu")
    target[1] = -100
    torch.autograd.gradcheck(lambda *a: pyfused.fused_mlp(*a, activation=activation), (x, w1, b1, w2, b2))
    for reduction in ("mean", "sum", "none"):
        torch.autograd.gradcheck(
            lambda *a: pyfused.fused_mlp_nll(*a, target, reduction=reduction, activation=activation),
            (x, w1, b1, w2, b2))


@pytest.mark.parametrize("tiles", ["small batch", "64 rows"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(backend, dtype, activation, tiles, monkeypatch):
    """|ours − ref64| ≤ 2·|torch_same_dtype − ref64| + atol (the flash-attention rule), loss and gradients; the
    forward also with its large-batch tiles (64 rows, forced at 40 rows: one ragged block).
    On CPU the Triton side runs fp16 only: the interpreter has no bfloat16 (tested below)."""
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes garbage for bfloat16; pyfused refuses it (tested below)")
    if tiles == "64 rows":
        if backend == "torch":
            pytest.skip("the kernels' tiles")
        from pyfused.kernels import rows

        monkeypatch.setattr(rows, "LARGE_BATCH", 32)
        assert rows.rows_config(40, (48, 32, 10), dtype, forward=True, backward=False)["BLOCK_M"] == 64
    shape = ((300,), 784, 128, 10) if DEVICE == "cuda" else ((40,), 48, 32, 10)
    x, w1, b1, w2, b2, target = make(*shape, True, dtype=dtype)
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, w1, b1, w2, b2)]
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target, activation=activation)
    same = F.nll_loss(reference(x, w1, b1, w2, b2, dtype=dtype, activation=activation), target)
    ref = F.nll_loss(reference(*ref_inputs, activation=activation), target)
    assert loss.dtype == dtype
    ours = [loss, *torch.autograd.grad(loss, [x, w1, b1, w2, b2])]
    theirs = [same, *torch.autograd.grad(same, [x, w1, b1, w2, b2])]
    exact = [ref, *torch.autograd.grad(ref, ref_inputs)]
    for o, t, e in zip(ours, theirs, exact):
        assert o.dtype == dtype
        err, torch_err = (o.double() - e).abs(), (t.double() - e).abs()
        assert (err <= 2 * torch_err + 2e-3).all(), f"max excess {(err - 2 * torch_err).max().item():.3g}"


def test_bfloat16_refused_by_the_interpreter(monkeypatch):
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w1, b1, w2, b2, _ = make((3,), 4, 5, 2, True, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(RuntimeError, match="bfloat16"):
        pyfused.fused_mlp(x, w1, b1, w2, b2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 needs a GPU")
def test_tf32_cuda(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x, w1, b1, w2, b2, target = make((256,), 784, 128, 10, True, device="cuda")
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target)
    torch.testing.assert_close(loss.double(), F.nll_loss(reference(x, w1, b1, w2, b2), target), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_target_out_of_range_gives_nan():
    x, w1, b1, w2, b2, target = make((8,), 6, 8, 3, True, device="cuda")
    target[0] = 3
    assert torch.isnan(pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target))


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w1, b1, w2, b2, _ = make((3,), 4, 5, 2, True, device="cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        pyfused.fused_mlp(x, w1, b1, w2, b2)


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("PYFUSED_BACKEND", "cuda")
    with pytest.raises(ValueError, match="PYFUSED_BACKEND"):
        backend_mod.requested()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_small_integer_targets_give_the_int64_result(backend, dtype, reduction):
    """13 rows (a ragged last row block); -100 ignored where the dtype holds it."""
    x, w1, b1, w2, b2, target = make((13,), 10, 12, 5, True)
    if dtype != torch.uint8:
        target[::4] = -100
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target.to(dtype), reduction=reduction)
    ref = F.nll_loss(reference(x, w1, b1, w2, b2), target, reduction=reduction)
    check(loss, ref)
    check_grads(loss, ref, [x, w1, b1, w2, b2])


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
def test_float64_is_computed_in_float64(backend, activation):
    """float64 end to end (fp64 accumulators in every kernel; the interpreter once hid fp32 ones): to 1e-10 of
    the float64 graph, loss and every gradient, through the two-layer ops and a deeper chain."""
    x, w1, b1, w2, b2, target = make((21,), 30, 24, 7, True, dtype=torch.float64)
    w0 = torch.randn(30, 30, dtype=torch.float64, device=x.device).div_(6).requires_grad_()
    loss = pyfused.fused_mlp_nll(x, w1, b1, w2, b2, target, activation=activation)
    ref = F.nll_loss(reference(x, w1, b1, w2, b2, activation=activation), target)
    check(loss, ref, torch.float64)
    tensors = [x, w1, b1, w2, b2]
    for ours, theirs in zip(torch.autograd.grad(loss, tensors), torch.autograd.grad(ref, tensors)):
        check(ours, theirs, torch.float64)
    y = pyfused.fused_deep_mlp(x, (w0, w1, w2), (None, b1, b2), (activation, activation))
    ref = reference(ACT[activation](x @ w0.t()), w1, b1, w2, b2, activation=activation)
    check(y, ref, torch.float64)
    grad = torch.randn_like(y)
    tensors = [x, w0, w1, b1, w2, b2]
    for ours, theirs in zip(torch.autograd.grad(y, tensors, grad), torch.autograd.grad(ref, tensors, grad)):
        check(ours, theirs, torch.float64)
