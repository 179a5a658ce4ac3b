"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW on every backend (the torch path: torch's own foreach
ops, exact; the kernel: float32 math with float64 bias corrections, rtol 1e-5 / atol 1e-6 after 20 steps), and
PyTorch's own optimizer conformance inputs for SGD, Adam and AdamW (``torch.testing._internal.common_optimizers``).
16-bit parameters are measured against a float64 run from the same start with the same gradients:
‖ours − ref64‖ ≤ 2·‖torch_same_dtype − ref64‖ + 1e-3 per tensor.
"""
import copy
import itertools

import pytest
import torch

import pyfused
from pyfused import FusedAdam, FusedAdamW, FusedSGD

from utils import NEVER, closure_for, make_params, pytorch_optimizer_inputs, set_grads, twin

STEPS = 20
KERNEL_TOL = dict(rtol=1e-5, atol=1e-6)
PAIRS = {"adam": (FusedAdam, torch.optim.Adam), "adamw": (FusedAdamW, torch.optim.AdamW)}
STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
OPTIONS = [dict(weight_decay=wd, amsgrad=ams, maximize=mx, **extra)
           for wd, ams, mx, extra in itertools.product((0.0, 0.02), (False, True), (False, True),
                                                       ({}, dict(betas=(0.8, 0.99), eps=1e-6, lr=0.01)))]


def check(ours, theirs, opt, ref, exact):
    """Parameters and every state tensor: exact on the torch path, to rounding on the kernel."""
    tol = dict(rtol=0, atol=0) if exact else KERNEL_TOL
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, **tol)
        mine, torchs = opt.state.get(p, {}), ref.state.get(q, {})
        assert set(mine) == set(torchs)
        for key in mine:
            a, b = mine[key], torchs[key]
            if key == "step":
                assert a.dtype == torch.float32 and float(a) == float(b)
            else:
                torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_torch(backend, device, name, options):
    ours = make_params(device)
    theirs = twin(ours)
    fused, eager = PAIRS[name]
    opt, ref = fused(ours, **options), eager(theirs, **options)
    for step in range(STEPS):
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
    check(ours, theirs, opt, ref, backend == "torch")
    assert ours[NEVER].grad is None and len(opt.state.get(ours[NEVER], {})) == 0
    if backend == "triton":  # torch's fused=True keeps the step on the parameters' device too
        assert all(s["step"].device == ours[0].device for s in opt.state.values())


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("first", ["fused", "torch"])
def test_state_dict_interchange(backend, device, name, first):
    """10 steps with one class, 10 more with the other from its state_dict (deep-copied, so nothing is
    shared): the result is torch's 20 steps."""
    fused, eager = PAIRS[name]
    classes = dict(fused=fused, torch=eager)
    second = "torch" if first == "fused" else "fused"

    def groups(ps):
        return [dict(params=ps[:4], amsgrad=True, weight_decay=0.01), dict(params=ps[4:], lr=0.02, maximize=True)]

    swapped = make_params(device)
    straight = twin(swapped)
    opt_a, ref = classes[first](groups(swapped)), eager(groups(straight))
    for step in range(10):
        set_grads(step, swapped, straight)
        opt_a.step()
        ref.step()
    opt_b = classes[second](groups(swapped))
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for step in range(10, STEPS):
        set_grads(step, swapped, straight)
        opt_b.step()
        ref.step()
    check(swapped, straight, opt_b, ref, backend == "torch")


def test_param_groups_scheduler_closure_and_tensor_lr(backend, device):
    """Three groups (one added mid-run), a tensor lr in the first (StepLR fills it in place, as it would for
    torch's own tensor lr), a closure; losses and the whole state against torch."""
    ours = make_params(device)
    theirs = twin(ours)
    targets = [torch.randn_like(p) for p in ours]

    def groups(ps, lr):
        return [dict(params=ps[:3], lr=lr, amsgrad=True), dict(params=ps[3:5], betas=(0.5, 0.9), weight_decay=0.1)]

    opt = FusedAdamW(groups(ours, torch.tensor(0.02, device=device)), lr=0.01)
    ref = torch.optim.AdamW(groups(theirs, torch.tensor(0.02)), lr=0.01, foreach=False)  # torch: tensor lr
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (opt, ref)]
    for step in range(STEPS):
        if step == 6:
            opt.add_param_group(dict(params=ours[5:], weight_decay=0.5))
            ref.add_param_group(dict(params=theirs[5:], weight_decay=0.5))
        loss, ref_loss = opt.step(closure_for(opt, ours, targets)), ref.step(closure_for(ref, theirs, targets))
        torch.testing.assert_close(loss, ref_loss, **(dict(rtol=0, atol=0) if backend == "torch" else
                                                      dict(rtol=1e-5, atol=1e-5)))
        for sched in scheds:
            sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor) and float(opt.param_groups[0]["lr"]) < 0.02
    assert [float(g["lr"]) for g in opt.param_groups] == [float(g["lr"]) for g in ref.param_groups]
    check(ours, theirs, opt, ref, backend == "torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_against_float64(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 (pyfused refuses it)")
    ours = make_params(device, (dtype,))
    theirs, exact = twin(ours), twin(ours, torch.float64)
    options = dict(lr=0.01, weight_decay=0.01, amsgrad=True, eps=1e-3)
    opt, ref, ref64 = FusedAdam(ours, **options), torch.optim.Adam(theirs, **options), \
        torch.optim.Adam(exact, **options)
    for step in range(STEPS):
        set_grads(step, ours, theirs, exact)
        for o in (opt, ref, ref64):
            o.step()
    for a, b, r in zip(ours, theirs, exact):
        assert a.dtype == dtype
        assert (a.double() - r).norm() <= 2 * (b.double() - r).norm() + 1e-3


PARAMS = lambda device, dtype: [torch.randn(4, 3, device=device, dtype=dtype).requires_grad_(),  # noqa: E731
                                torch.randn(3, device=device, dtype=dtype).requires_grad_()]


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_pytorch_optimizer_inputs(backend, device, name):
    """Every configuration of PyTorch's own optimizer tests: ours and torch's take 5 steps from the same start."""
    fused, eager = {"sgd": (FusedSGD, torch.optim.SGD), **PAIRS}[name]
    co = pytorch_optimizer_inputs()
    for optim_input in getattr(co, f"optim_inputs_func_{name}")(device, torch.float32):
        kwargs = optim_input.kwargs
        ours = PARAMS(device, torch.float32)
        theirs = twin(ours)
        opt, ref = fused(ours, **kwargs), eager(theirs, **kwargs)
        for step in range(5):
            set_grads(step, ours, theirs)
            opt.step()
            ref.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, **(dict(rtol=0, atol=0) if backend == "torch" else KERNEL_TOL),
                                       msg=lambda m: f"{optim_input.desc}: {m}")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_pytorch_optimizer_error_inputs(device, name):
    """PyTorch's own error inputs: the same error types, messages matching its regexes."""
    fused = {"sgd": FusedSGD, "adam": FusedAdam, "adamw": FusedAdamW}[name]
    co = pytorch_optimizer_inputs()
    cases = getattr(co, f"optim_error_inputs_func_{name}")(device, torch.float32)
    assert cases or device != "cpu"
    for case in cases:
        optim_input = case.optimizer_error_input
        params = optim_input.params if optim_input.params is not None else PARAMS(device, torch.float32)

        def build():
            opt = fused(params, **optim_input.kwargs)
            if case.error_on == co.OptimizerErrorEnum.STEP_ERROR:
                opt.step()

        if issubclass(case.error_type, Warning):
            with pytest.warns(case.error_type, match=case.error_regex):
                build()
        else:
            with pytest.raises(case.error_type, match=case.error_regex):
                build()


def test_differentiable_is_refused():
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        FusedAdam([torch.zeros(2, requires_grad=True)], differentiable=True)
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        FusedSGD([torch.zeros(2, requires_grad=True)], differentiable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_step_does_not_synchronise_and_graphs_replay():
    ours = make_params("cuda")[:3]
    theirs = twin(ours)
    for p in ours + theirs:
        p.grad = torch.zeros_like(p)
    opt, ref = FusedAdam(ours, lr=torch.tensor(0.01, device="cuda"), amsgrad=True), \
        torch.optim.Adam(theirs, lr=0.01, amsgrad=True)
    set_grads(1, ours, theirs)
    opt.step()
    ref.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(3):
        graph.replay()
        ref.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert float(opt.state[ours[0]]["step"]) == 5


def test_a_new_optimizer_in_a_train_step_and_its_state_names():
    model = pyfused.FusedMLP(4, 5, 3)
    opt = FusedAdamW(model.parameters())
    assert opt.defaults["weight_decay"] == 1e-2 and opt.param_groups[0]["decoupled_weight_decay"]
    assert set(opt.defaults) >= {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach",
                                 "capturable", "differentiable", "fused"}
