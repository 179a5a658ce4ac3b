"""FusedTrainStep against the eager loop it replaces, on every backend.

The eager loop: nn.Linear pair → ReLU → log_softmax → F.nll_loss (mean, ignore_index) → backward →
torch.optim.SGD.step → zero_grad(set_to_none=True), from the same initial parameters and batches. Tolerances
after 30 steps (losses at every step, parameters and momentum buffers at the end), float32: rtol=1e-5,
atol=1e-6 on CPU (torch path and Triton interpreter: IEEE fp32, different summation orders); rtol=1e-4,
atol=1e-5 on CUDA (other reduction orders again, compounded over the steps).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfused
from pyfused import checks
from pyfused.optim import FusedSGD
from pyfused.train_step import FusedTrainStep

from conftest import DEVICE

# 0/0 for the mean over a batch without counted rows, as in torch; the interpreter's numpy warns about it
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
TOL = dict(rtol=1e-5, atol=1e-6) if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-5)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def pair(n_in, hidden, out, bias, seed=0, activation="relu"):
    """(FusedMLP, nn.Sequential of the same nn.Linear parameters, copied) on DEVICE."""
    torch.manual_seed(seed)
    model = pyfused.FusedMLP(n_in, hidden, out, bias=bias, device=DEVICE, activation=activation)
    act = nn.ReLU() if activation == "relu" else nn.Sigmoid()
    ref = nn.Sequential(nn.Linear(n_in, hidden, bias), act, nn.Linear(hidden, out, bias)).to(DEVICE)
    ref.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in model.state_dict().items()})
    return model, ref


def batches(n_rows, n_in, out, steps, seed=1, all_ignored_at=None):
    """Random batches with every 5th row ignored (and every row at step ``all_ignored_at``)."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(n_rows, n_in, generator=g)
        t = torch.randint(0, out, (n_rows,), generator=g)
        t[::5] = -100
        if i == all_ignored_at:
            t[:] = -100
        yield x.to(DEVICE), t.to(DEVICE)


def groups(model, bias_group):
    """All parameters in one group, or the biases in a second one without weight decay at half the lr."""
    if not bias_group:
        return list(model.parameters())
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return [dict(params=weights), dict(params=biases, weight_decay=0.0, lr=0.05)]


def eager_step(ref, ref_opt, x, t):
    """The loop FusedTrainStep replaces: nll_loss, backward, step, zero_grad(set_to_none=True); the loss."""
    ref_loss = F.nll_loss(F.log_softmax(ref(x), dim=1), t)
    ref_loss.backward()
    ref_opt.step()
    ref_opt.zero_grad(set_to_none=True)
    return ref_loss.detach()


def check_same(model, opt, ref, ref_opt):
    for (name, ours), theirs in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(ours, theirs, **TOL, msg=lambda m: f"{name}: {m}")
        assert ours.grad is None
        if "momentum_buffer" in ref_opt.state[theirs]:
            torch.testing.assert_close(opt.state[ours]["momentum_buffer"], ref_opt.state[theirs]["momentum_buffer"],
                                       **TOL, msg=lambda m: f"{name} momentum_buffer: {m}")
        else:
            assert "momentum_buffer" not in opt.state[ours]


CASES = {  # (rows, in, hidden, out), bias, SGD options, biases in their own group, lr schedule[, activation]
    "bias-plain-sched": ((13, 29, 19, 7), True, dict(lr=0.1), True, True),
    "bias-nesterov-wd": ((13, 29, 19, 7), True, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
                         False, True),
    "dampening-wd-maximize": ((13, 29, 19, 7), False, dict(lr=0.02, momentum=0.5, dampening=0.3,
                                                           weight_decay=0.02, maximize=True), False, False),
    # more of the kernels' tiling: 3 row blocks; 2 hidden slices and 2 rows of dW1 tiles
    "three-row-blocks": ((40, 24, 20, 6), False, dict(lr=0.1, momentum=0.9), False, False),
    "two-hidden-slices": ((17, 6, 136, 3), True, dict(lr=0.1, momentum=0.9), True, False),
    # the course's small net's activation: sigmoid, its derivative read off the saved output
    "sigmoid-bias-momentum": ((13, 20, 13, 3), True, dict(lr=0.5, momentum=0.9), False, False, "sigmoid"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trajectory_matches_eager(step_backend, case):
    """30 steps; every batch has ignored rows, the fifth only ignored rows (NaN loss, zero gradient)."""
    (rows, n_in, hidden, out), bias, options, bias_group, schedule, *activation = CASES[case]
    model, ref = pair(n_in, hidden, out, bias, activation=(activation or ["relu"])[0])
    opt, ref_opt = FusedSGD(groups(model, bias_group), **options), torch.optim.SGD(groups(ref, bias_group), **options)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 4, gamma=0.5) for o in (opt, ref_opt)] if schedule else []
    step = FusedTrainStep(model, opt)
    for x, t in batches(rows, n_in, out, 30, all_ignored_at=4):
        loss = step(x, t)
        ref_loss = eager_step(ref, ref_opt, x, t)
        for s in scheds:
            s.step()
        assert loss.shape == () and loss.dtype == ref_loss.dtype
        torch.testing.assert_close(loss, ref_loss, equal_nan=True, **TOL)
    check_same(model, opt, ref, ref_opt)


@pytest.mark.parametrize("name", ["torch", "auto"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_seed_shape_torch_path(monkeypatch, momentum, name):
    """The seed workload (784 → 128 → 10, no bias, lr 0.15, batch 128) on the CPU product path: eager's ops
    (``torch``), and under ``auto`` the two large GEMMs (x w₁ᵀ and dW₁) on oneDNN, the small ones on MKL."""
    from pyfused import cpu_gemm

    monkeypatch.setenv("PYFUSED_BACKEND", name)
    if name == "auto" and (DEVICE != "cpu" or not cpu_gemm.available()):
        pytest.skip("oneDNN's products are the CPU torch path's (auto on CUDA runs the kernels)")
    calls, real = [], cpu_gemm._abt
    monkeypatch.setattr(cpu_gemm, "_abt", lambda a, b, bias=None: calls.append((a.shape, b.shape)) or real(a, b, bias))
    model, ref = pair(784, 128, 10, False)
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.15, momentum=momentum), \
        torch.optim.SGD(ref.parameters(), lr=0.15, momentum=momentum)
    step = FusedTrainStep(model, opt)
    for x, t in batches(128, 784, 10, 30):
        loss = step(x, t)
        ref_loss = eager_step(ref, ref_opt, x, t)
        torch.testing.assert_close(loss, ref_loss, **TOL)
    check_same(model, opt, ref, ref_opt)
    if name == "auto":
        assert calls[:2] == [((128, 784), (128, 784)), ((128, 128), (784, 128))] and len(calls) == 60
    else:
        assert calls == []


@pytest.mark.parametrize("bias", [True, False])
def test_keep_grad_leaves_the_step_gradients(step_backend, bias):
    model, ref = pair(9, 12, 4, bias)
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True), \
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True)
    step = FusedTrainStep(model, opt, keep_grad=True)
    for x, t in batches(21, 9, 4, 3):
        step(x, t)
        F.nll_loss(F.log_softmax(ref(x), dim=1), t).backward()
        ref_opt.step()
        for ours, theirs in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(ours.grad, theirs.grad, **TOL)
            torch.testing.assert_close(ours, theirs, **TOL)
        ref_opt.zero_grad(set_to_none=True)
    storage = step.flat_grad.untyped_storage().data_ptr()
    assert all(p.grad.untyped_storage().data_ptr() == storage for p in model.parameters())  # one flat buffer


def test_strided_and_empty_batches(step_backend):
    """Column-major x and a strided target; then a batch of no rows (NaN loss, zero gradient, momentum goes on)."""
    model, ref = pair(9, 12, 4, True)
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1), \
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    step = FusedTrainStep(model, opt)
    data = [(x.t().contiguous().t(), torch.stack([t, t], 1)[:, 0]) for x, t in batches(20, 9, 4, 2)]
    data.append((torch.empty(0, 9, device=DEVICE), torch.empty(0, dtype=torch.int64, device=DEVICE)))
    for x, t in data:
        loss = step(x, t)
        ref_loss = eager_step(ref, ref_opt, x, t)
        torch.testing.assert_close(loss, ref_loss, equal_nan=True, **TOL)
    assert not data[0][0].is_contiguous() and data[0][1].stride() == (2,)
    check_same(model, opt, ref, ref_opt)


def test_tensor_lr_and_torch_sgd(backend):
    """lr as a 0-dim tensor changed in place between steps; torch.optim.SGD as the optimizer."""
    model, ref = pair(9, 12, 4, True)
    lr = torch.tensor(0.1)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.5), \
        torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    step = FusedTrainStep(model, opt)
    for i, (x, t) in enumerate(batches(10, 9, 4, 4)):
        lr.fill_(0.1 / (i + 1))
        ref_opt.param_groups[0]["lr"] = 0.1 / (i + 1)
        step(x, t)
        eager_step(ref, ref_opt, x, t)
    check_same(model, opt, ref, ref_opt)


def test_losses_are_independent_and_deterministic(step_backend):
    runs = []
    for _ in range(2):
        model, _ = pair(9, 12, 4, True)
        step = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.1, momentum=0.9))
        losses = [step(x, t) for x, t in batches(20, 9, 4, 3)]
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert len({float(l) for l in runs[0][0]}) == 3  # each call returns its own tensor
    for a, b in zip(runs[0][0] + runs[0][1], runs[1][0] + runs[1][1]):
        assert torch.equal(a, b)


def test_momentum_state_interchanges_with_torch_sgd(step_backend):
    """Buffers made by the step are the optimizer's state: a torch.optim.SGD loaded from its state_dict continues
    the same trajectory as the step does."""
    model, ref = pair(9, 12, 4, False)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    step = FusedTrainStep(model, opt)
    data = list(batches(20, 9, 4, 4))
    for x, t in data[:2]:
        step(x, t)
    ref.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in model.state_dict().items()})
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict would alias the buffers
    for x, t in data[2:]:
        step(x, t)
        eager_step(ref, ref_opt, x, t)
    check_same(model, opt, ref, ref_opt)


@pytest.mark.parametrize("tiles", ["16 rows", "64 rows", "128 rows", "wide gradient tiles"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_step(backend, dtype, tiles, monkeypatch):
    """Two steps in half precision against fp64 and same-dtype eager, by the flash-attention rule
    |ours − ref64| ≤ 2·|torch_same_dtype − ref64| + atol, on the losses, parameters and momentum buffers; with the
    row kernel's small-batch tiles (with a ragged hidden slice) and its large-batch tiles — 64 rows (an input
    width that is not a multiple of 16), 128 rows (one that is) — forced at 40 rows (one ragged block), and the
    gradient kernel's large-batch tiles (128 columns, 16 warps in 16-bit dtypes) likewise."""
    if backend == "triton" and DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 (pyfused refuses it)")
    n_in, hidden = (24 if tiles == "64 rows" else 32), (40 if tiles == "16 rows" else 32)
    if tiles in ("64 rows", "128 rows"):
        if backend == "torch":
            pytest.skip("the kernels' tiles")
        from pyfused.kernels import rows

        monkeypatch.setattr(rows, "LARGE_BATCH", 32)
        cfg = rows.rows_config(40, (n_in, hidden, 10), dtype, forward=True, backward=True)
        assert cfg["BLOCK_M"] == int(tiles.split()[0])
    if tiles == "wide gradient tiles":
        if backend == "torch":
            pytest.skip("the kernels' tiles")
        from pyfused.kernels import grads

        monkeypatch.setattr(grads, "WIDE_FROM", 32)
        cfg = grads.grads_config(40, (n_in, hidden, 10), dtype, "update")
        assert (cfg["BLOCK_N"], cfg["num_warps"]) == (128, 16)
    model, ref = pair(n_in, hidden, 10, True)
    model.to(dtype)
    refs = {d: copy.deepcopy(ref).to(d) for d in (dtype, torch.float64)}
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opts = {d: torch.optim.SGD(r.parameters(), lr=0.1, momentum=0.9) for d, r in refs.items()}
    step = FusedTrainStep(model, opt)
    for x, t in batches(40, n_in, 10, 2):
        ours = [step(x.to(dtype), t)]
        losses = {}
        for d, r in refs.items():
            losses[d] = F.nll_loss(F.log_softmax(r(x.to(d)), dim=1), t)
            losses[d].backward()
            ref_opts[d].step()
            ref_opts[d].zero_grad(set_to_none=True)
        same, exact = [losses[dtype]], [losses[torch.float64]]
        for p, q, e in zip(model.parameters(), refs[dtype].parameters(), refs[torch.float64].parameters()):
            ours += [p, opt.state[p]["momentum_buffer"]]
            same += [q, ref_opts[dtype].state[q]["momentum_buffer"]]
            exact += [e, ref_opts[torch.float64].state[e]["momentum_buffer"]]
        for o, s, e in zip(ours, same, exact):
            assert o.dtype == dtype
            err, torch_err = (o.double() - e).abs(), (s.double() - e).abs()
            assert (err <= 2 * torch_err + 2e-3).all(), f"max excess {(err - 2 * torch_err).max().item():.3g}"


@pytest.mark.skipif(DEVICE != "cpu", reason="CUDA targets are not read on the host (NaN loss instead)")
def test_target_out_of_range_on_cpu_raises(backend):
    model, _ = pair(5, 6, 3, True)
    step = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.1))
    with pytest.raises(IndexError):
        step(torch.randn(4, 5), torch.tensor([0, 1, 3, 2]))


def test_errors_name_the_problem():
    model, ref = pair(5, 6, 3, True)
    opt = FusedSGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="model must be a pyfused.FusedMLP"):
        FusedTrainStep(ref, opt)
    with pytest.raises(TypeError, match="optimizer must be a pyfused.FusedSGD, FusedAdam or FusedAdamW"):
        FusedTrainStep(model, torch.optim.RMSprop(model.parameters()))
    with pytest.raises(ValueError, match="loss='cross_entropy' does not fit the model's head"):
        FusedTrainStep(model, opt, loss="cross_entropy")
    with pytest.raises(ValueError, match="reduction must be one of"):
        FusedTrainStep(model, opt, reduction="none")
    with pytest.raises(ValueError, match="fc2.bias is not in the optimizer"):
        FusedTrainStep(model, FusedSGD([model.fc1.weight, model.fc1.bias, model.fc2.weight], lr=0.1))
    with pytest.raises(ValueError, match="differentiable"):
        FusedTrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1, differentiable=True))
    with pytest.raises(TypeError, match="ignore_index"):
        FusedTrainStep(model, opt, ignore_index=1.5)
    model.fc1.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="fc1.bias does not require grad"):
        FusedTrainStep(model, opt)
    model.fc1.bias.requires_grad_(True)
    step = FusedTrainStep(model, opt)
    x, t = torch.randn(4, 5, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)
    with pytest.raises(checks.ShapeError, match=r"x must have shape \(B, 5\)"):
        step(x.view(2, 2, 5), t)
    with pytest.raises(checks.DTypeError, match="x must have the parameters' dtype"):
        step(x.double(), t)
    with pytest.raises(checks.DTypeError, match="target must hold integer"):
        step(x, t.float())
    with pytest.raises(checks.ShapeError, match="target must have shape"):
        step(x, t[:3])
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="capture"):
            step.capture(x, t)


def test_parameters_swapped_for_strided_ones_are_refused_on_the_torch_path(monkeypatch):
    """The torch path re-checks the parameters when their storage changes: a strided ``.data`` (which the
    kernels and oneDNN would read as contiguous) raises before anything runs."""
    monkeypatch.setenv("PYFUSED_BACKEND", "torch")
    model, _ = pair(5, 6, 3, True)
    step = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.1))
    x, t = torch.randn(4, 5, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)
    step(x, t)
    model.fc1.weight.data = model.fc1.weight.data.t().contiguous().t()
    with pytest.raises(RuntimeError, match="layout"):
        step(x, t)


@CUDA
def test_cuda_step_does_not_synchronise():
    model, _ = pair(784, 128, 10, False)
    step = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.15, momentum=0.9))
    data = list(batches(128, 784, 10, 3))
    step(*data[0])
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, t in data[1:]:
            step(x, t)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
def test_cuda_graph_capture_matches_eager():
    """Captured step (with an lr schedule and a last, smaller batch outside the graph) against eager."""
    model, ref = pair(784, 128, 10, True)
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.15, momentum=0.9), \
        torch.optim.SGD(ref.parameters(), lr=0.15, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.StepLR(o, 10, gamma=0.5) for o in (opt, ref_opt)]
    step = FusedTrainStep(model, opt)
    data = list(batches(128, 784, 10, 30)) + list(batches(37, 784, 10, 1, seed=2))
    step.capture(*data[0])
    for ours, theirs in zip(model.parameters(), ref.parameters()):
        assert torch.equal(ours, theirs)  # capturing trains nothing
    for x, t in data:
        loss = step(x, t)
        ref_loss = eager_step(ref, ref_opt, x, t)
        for s in scheds:
            s.step()
        torch.testing.assert_close(loss, ref_loss, **TOL)
    check_same(model, opt, ref, ref_opt)


@CUDA
def test_static_inputs_replay_without_copies(monkeypatch):
    """A batch written into the captured graph's static inputs replays without copying it again, and gives the
    eager step's numbers."""
    model, ref = pair(784, 128, 10, True)
    opt, ref_opt = FusedSGD(model.parameters(), lr=0.15, momentum=0.9), \
        torch.optim.SGD(ref.parameters(), lr=0.15, momentum=0.9)
    step = FusedTrainStep(model, opt)
    assert step.static_inputs is None
    data = list(batches(128, 784, 10, 4))
    step.capture(*data[0])
    static_x, static_t = step.static_inputs
    copied = []
    original_copy = torch.Tensor.copy_

    def counting(self, *args, **kwargs):
        if self is static_x or self is static_t:
            copied.append(self)
        return original_copy(self, *args, **kwargs)

    for x, t in data:
        static_x.copy_(x)
        static_t.copy_(t)
        monkeypatch.setattr(torch.Tensor, "copy_", counting)
        loss = step(static_x, static_t)
        monkeypatch.undo()
        assert not copied
        torch.testing.assert_close(loss, eager_step(ref, ref_opt, x, t), **TOL)
    check_same(model, opt, ref, ref_opt)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_small_integer_targets_give_the_int64_result(backend, dtype):
    """Raw Fashion-MNIST labels are uint8. 13 rows (not a multiple of the row block): the padding rows must not
    count, whatever the target dtype makes of ignore_index; ignored rows where the dtype can hold -100."""
    runs = {}
    for tdtype in (torch.int64, dtype):
        model, _ = pair(9, 12, 4, True)
        step = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.1, momentum=0.9))
        losses = []
        for x, t in batches(13, 9, 4, 3):
            if dtype == torch.uint8:
                t = t.clamp(min=0)
            losses.append(step(x, t.to(tdtype)))
        runs[tdtype] = losses + [p.detach().clone() for p in model.parameters()]
    for a, b in zip(runs[torch.int64], runs[dtype]):
        assert torch.isfinite(b).all()
        assert torch.equal(a, b)
