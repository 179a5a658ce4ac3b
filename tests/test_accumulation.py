"""FusedTrainStep(..., accumulation_steps=k) against the course's eager accumulation loop, on every backend.

The eager loop: for each group of k batches (the last group of an epoch may have r < k), ``(loss / g).backward()``
per batch with g the group's size, then ``optimizer.step()`` and ``zero_grad``. FusedTrainStep applies the update
at every k-th call and ``flush()`` applies a trailing group of r. Compared after every group: the losses of every
batch, ``.grad`` (keep_grad; mid-group too), parameters and momentum buffers. Tolerances as in
test_train_step.py (float32: rtol=1e-5, atol=1e-6 on CPU; rtol=1e-4, atol=1e-5 on CUDA).
"""
import pytest
import torch
import torch.nn.functional as F

from pyfused.optim import FusedSGD
from pyfused.train_step import FusedTrainStep

from conftest import DEVICE
from test_train_step import TOL, batches, check_same, groups, pair

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")

OPTIONS = {  # bias, SGD options, biases in their own param group
    "momentum": (False, dict(lr=0.1, momentum=0.9), False),
    "bias-nesterov-wd-groups": (True, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), True),
    "plain-maximize": (True, dict(lr=0.05, maximize=True), False),
}


def eager_group(ref, group_batches):
    """The eager loop's backward passes over one group: each batch's mean loss divided by the group size."""
    losses = []
    for x, t in group_batches:
        loss = F.nll_loss(F.log_softmax(ref(x), dim=1), t)
        (loss / len(group_batches)).backward()
        losses.append(loss.detach())
    return losses


@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_accumulation_matches_the_eager_loop(step_backend, k, options):
    """10 batches of 11 rows (every 5th row ignored, batch 4 all ignored), then 3 more of 6 rows as a new
    "epoch": k = 3 ends the first epoch with a group of 1 and k = 8 with one of 2, each flushed."""
    bias, sgd_options, bias_group = OPTIONS[options]
    model, ref = pair(9, 12, 4, bias)
    opt = FusedSGD(groups(model, bias_group), **sgd_options)
    ref_opt = torch.optim.SGD(groups(ref, bias_group), **sgd_options)
    step = FusedTrainStep(model, opt, accumulation_steps=k, keep_grad=True)
    epochs = [list(batches(11, 9, 4, 10, all_ignored_at=4)), list(batches(6, 9, 4, 3, seed=2))]
    for data in epochs:
        for start in range(0, len(data), k):
            group = data[start:start + k]
            ref_losses = eager_group(ref, group)
            for i, (x, t) in enumerate(group):
                loss = step(x, t)
                torch.testing.assert_close(loss, ref_losses[i], equal_nan=True, **TOL)
            assert step.flush() == (len(group) < k)
            assert not step.flush()  # nothing pending after an update
            for ours, theirs in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(ours.grad, theirs.grad, **TOL)
            ref_opt.step()
            ref_opt.zero_grad(set_to_none=True)
            for ours, theirs in zip(model.parameters(), ref.parameters()):
                ours.grad = None
            check_same(model, opt, ref, ref_opt)


def test_gradients_mid_group_and_without_keep_grad(step_backend):
    """keep_grad: .grad holds the running sum of the group's scaled gradients between calls, as eager .grad
    does; without keep_grad .grad stays None. Parameters move only at the k-th call."""
    model, ref = pair(9, 12, 4, True)
    kept = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.1, momentum=0.9), accumulation_steps=3,
                          keep_grad=True)
    data = list(batches(11, 9, 4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    for i, (x, t) in enumerate(data[:2]):
        kept(x, t)
        (F.nll_loss(F.log_softmax(ref(x), dim=1), t) / 3).backward()
        for ours, theirs, start in zip(model.parameters(), ref.parameters(), before):
            torch.testing.assert_close(ours.grad, theirs.grad, **TOL)
            assert torch.equal(ours, start)

    bare, _ = pair(9, 12, 4, True)
    step = FusedTrainStep(bare, FusedSGD(bare.parameters(), lr=0.1), accumulation_steps=2)
    for x, t in data:
        step(x, t)
        assert all(p.grad is None for p in bare.parameters())


def test_accumulation_is_deterministic(step_backend):
    runs = []
    for _ in range(2):
        model, _ = pair(9, 12, 4, True)
        step = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.1, momentum=0.9), accumulation_steps=2)
        losses = [step(x, t) for x, t in batches(20, 9, 4, 5)]
        step.flush()
        runs.append(losses + [p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_accumulation_errors():
    model, _ = pair(5, 6, 3, True)
    opt = FusedSGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="accumulation_steps must be at least 1, got 0"):
        FusedTrainStep(model, opt, accumulation_steps=0)
    for bad in (2.0, True):
        with pytest.raises(TypeError, match="accumulation_steps must be an int"):
            FusedTrainStep(model, opt, accumulation_steps=bad)
    if not torch.distributed.is_initialized():
        with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
            FusedTrainStep(model, opt, process_group=object())
    step = FusedTrainStep(model, opt, None, 2)
    x, t = torch.randn(4, 5, device=DEVICE), torch.tensor([0, 1, 2, 0], device=DEVICE)
    with pytest.raises(RuntimeError, match="accumulation"):
        step.capture(x, t)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias, activation", [(False, "relu"), (True, "relu"), (True, "sigmoid")])
def test_torch_path_is_bit_identical_to_the_eager_loop(monkeypatch, k, bias, activation):
    """On the torch path the step runs eager's own ATen ops in eager's order (the 1/k factor as the division's
    backward makes it, gradients added as AccumulateGrad adds them), so its parameters equal eager's exactly
    over whole groups. (A flushed partial group is rescaled by k/r afterwards: equal to rounding, tested above.)"""
    monkeypatch.setenv("PYFUSED_BACKEND", "torch")
    model, ref = pair(64, 32, 10, bias, activation=activation)
    opt = FusedSGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    step = FusedTrainStep(model, opt, accumulation_steps=k)
    data = list(batches(128, 64, 10, 9))
    for start in range(0, len(data), k):
        eager_group(ref, data[start:start + k])
        for x, t in data[start:start + k]:
            step(x, t)
        ref_opt.step()
        ref_opt.zero_grad()
    for ours, theirs in zip(model.parameters(), ref.parameters()):
        assert torch.equal(ours, theirs)
        assert torch.equal(opt.state[ours]["momentum_buffer"], ref_opt.state[theirs]["momentum_buffer"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_accumulation_does_not_synchronise():
    model, _ = pair(784, 128, 10, False)
    step = FusedTrainStep(model, FusedSGD(model.parameters(), lr=0.15, momentum=0.9), accumulation_steps=3)
    data = list(batches(128, 784, 10, 5))
    for x, t in data[:3]:
        step(x, t)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, t in data[3:]:
            step(x, t)
        step.flush()
    finally:
        torch.cuda.set_sync_debug_mode("default")
