"""FusedTrainStep for every loss × optimizer × depth × accumulation × reduction, against the eager loop it replaces:
``loss = F.<loss>(model(x), target, reduction); (loss / g).backward()`` per batch, ``optimizer.step(); zero_grad()``
after each group of g batches (k, or the r < k left at the end, which FusedTrainStep applies in ``flush()``), from
the same initial parameters. Losses after every batch, parameters and the optimizer's state at the end
(tests/utils.py STEP_TOL); on the torch path the parameters of whole groups are bit-identical to eager's."""
import pytest
import torch

import pyfused

from utils import DEVICE, OPTIMIZERS, STEP_TOL, batches, eager_loss, eager_twin

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
NETS = {2: ((9, 12, 4), ("relu",), True), 3: ((9, 12, 7, 4), ("relu", "sigmoid"), (False, False, True))}


def make(depth, loss, optimizer, bias_group=False, lr_scale=1.0):
    features, activations, bias = NETS[depth]
    torch.manual_seed(0)
    model = pyfused.DeepFusedMLP(*features, activation=activations, bias=bias, device=DEVICE,
                                 log_softmax=loss == "nll")
    ref = eager_twin(model)
    fused_cls, torch_cls, options = OPTIMIZERS[optimizer]
    options = dict(options, lr=options["lr"] * lr_scale)

    def groups(net):
        if not bias_group:
            return list(net.parameters())
        weights = [p for n, p in net.named_parameters() if n.endswith("weight")]
        return [dict(params=weights), dict(params=[p for n, p in net.named_parameters() if n.endswith("bias")],
                                           lr=options["lr"] / 2, weight_decay=0.0)]

    return model, ref, fused_cls(groups(model), **options), torch_cls(groups(ref), **options)


def check_state(model, opt, ref, ref_opt, exact=False, tol=STEP_TOL):
    tol = dict(rtol=0, atol=0) if exact else tol
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=lambda m: f"{name}: {m}")
        ours, theirs = opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert set(ours) == set(theirs), name
        for key, value in theirs.items():
            if key == "step":
                assert float(ours[key]) == float(value)
            else:
                torch.testing.assert_close(ours[key], value, **tol, msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("loss", ["nll", "cross_entropy", "mse"])
def test_matches_the_eager_loop(step_backend, loss, optimizer, depth, k, reduction):
    """7 batches of 11 rows (every 5th row ignored for class losses): k = 3 ends with a flushed group of 1."""
    # a summed loss's gradients are the rows' total: a smaller step keeps SGD with momentum from diverging
    model, ref, opt, ref_opt = make(depth, loss, optimizer, bias_group=depth == 3,
                                    lr_scale=0.1 if reduction == "sum" else 1.0)
    step = pyfused.FusedTrainStep(model, opt, accumulation_steps=k, loss=loss, reduction=reduction)
    data = list(batches(loss, 11, 9, 4, 7))
    # summed gradients are ~rows times larger: their rounding in another summation order too (absolute 1e-5)
    tol = dict(STEP_TOL, atol=max(STEP_TOL["atol"], 1e-5)) if reduction == "sum" else STEP_TOL
    for start in range(0, len(data), k):
        group = data[start:start + k]
        for x, t in group:
            loss_value = step(x, t)
            ref_loss = eager_loss(loss, ref(x), t, reduction)
            (ref_loss / len(group)).backward()
            assert loss_value.shape == () and loss_value.dtype == ref_loss.dtype
            torch.testing.assert_close(loss_value, ref_loss.detach(), **STEP_TOL)
        assert step.flush() == (len(group) < k)
        ref_opt.step()
        ref_opt.zero_grad()
        check_state(model, opt, ref, ref_opt, exact=step_backend == "torch" and DEVICE == "cpu" and len(group) == k,
                    tol=tol)
    check_state(model, opt, ref, ref_opt, tol=tol)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("loss", ["nll", "cross_entropy", "mse"])
def test_torch_optimizers_and_their_state_interchange(backend, loss):
    """torch.optim.Adam as the step's optimizer, then torch's own step() continues from the state the fused step
    made (step on the device on the kernel path, as torch's fused=True keeps it)."""
    model, ref, _, _ = make(3, loss, "adam")
    opt, ref_opt = torch.optim.Adam(model.parameters(), lr=0.01), torch.optim.Adam(ref.parameters(), lr=0.01)
    step = pyfused.FusedTrainStep(model, opt, loss=loss)
    data = list(batches(loss, 10, 9, 4, 6))
    for i, (x, t) in enumerate(data):
        if i < 3:
            step(x, t)
        else:
            eager_loss(loss, model(x), t).backward()
            opt.step()
            opt.zero_grad()
        eager_loss(loss, ref(x), t).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    check_state(model, opt, ref, ref_opt)


def test_keep_grad_with_adam_and_accumulation(step_backend):
    model, ref, opt, ref_opt = make(3, "mse", "adam")
    step = pyfused.FusedTrainStep(model, opt, accumulation_steps=2, loss="mse", reduction="sum", keep_grad=True)
    for i, (x, t) in enumerate(batches("mse", 8, 9, 4, 4)):
        step(x, t)
        (eager_loss("mse", ref(x), t, "sum") / 2).backward()
        for p, q in zip(model.parameters(), ref.parameters()):  # the running sum between calls, as eager's .grad
            torch.testing.assert_close(p.grad, q.grad, **STEP_TOL)
        if i % 2:
            ref_opt.step()
            ref_opt.zero_grad()
    check_state(model, opt, ref, ref_opt)


def test_loss_and_target_errors():
    model = pyfused.DeepFusedMLP(9, 12, 4, log_softmax=False)
    step = pyfused.FusedTrainStep(model, pyfused.FusedAdam(model.parameters()), loss="mse")
    x = torch.randn(5, 9, device=DEVICE)
    with pytest.raises(pyfused.checks.ShapeError, match=r"target must have the logits' shape \(5, 4\)"):
        step(x, torch.randn(5, device=DEVICE))
    with pytest.raises(pyfused.checks.DTypeError, match="target must be a floating-point tensor"):
        step(x, torch.zeros(5, 4, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="loss='nll' does not fit the model's head"):
        pyfused.FusedTrainStep(model, pyfused.FusedAdam(model.parameters()))
    with pytest.raises(TypeError, match="model must be a pyfused.FusedMLP or DeepFusedMLP"):
        pyfused.FusedTrainStep(torch.nn.Linear(3, 2), pyfused.FusedAdam(model.parameters()))
