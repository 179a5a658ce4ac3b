"""FusedSGD against torch.optim.SGD on every backend: the torch path, the Triton kernel (interpreter on CPU),
and CUDA when present (the ``device`` fixture).

Tolerances: the torch path runs torch's own ops in the parameter dtype, so it must match torch.optim.SGD
exactly (atol = rtol = 0). The kernel computes in float32 (fused multiply-adds on GPUs): float32 within
rtol 1e-5, atol 1e-6 after 20 steps; float16/bfloat16 are measured against a float64 run of torch.optim.SGD
from the same start with the same gradients, per tensor ‖ours − ref‖ ≤ 2·‖torch_same_dtype − ref‖ + 1e-3.
"""
import copy

import pytest
import torch

from pyfused.optim import FusedAdam, FusedSGD

from utils import NEVER, SHAPES, closure_for, make_params, set_grads, twin

STEPS = 20
KERNEL_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6)}

OPTIONS = [dict(momentum=0.0, weight_decay=wd, maximize=mx) for wd in (0.0, 0.01) for mx in (False, True)] + [
    dict(momentum=0.9, dampening=d, nesterov=n, weight_decay=wd, maximize=mx)
    for d, n in ((0.0, False), (0.0, True), (0.5, False)) for wd in (0.0, 0.01) for mx in (False, True)
]


def check(ours, theirs, backend, opt_ours=None, opt_theirs=None):
    """Parameters (and momentum buffers) of ``ours`` against ``theirs``: exact on the torch path."""
    pairs = list(zip(ours, theirs))
    if opt_ours is not None:
        pairs += [(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"])
                  for p, q in zip(ours, theirs) if "momentum_buffer" in opt_theirs.state.get(q, {})]
        assert sum(opt_ours.state.get(p, {}).get("momentum_buffer") is not None for p in ours) == len(pairs) - len(ours)
    for a, b in pairs:
        tol = dict(rtol=0, atol=0) if backend == "torch" else KERNEL_TOL[a.dtype]
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_matches_torch_sgd(backend, device, options):
    ours = make_params(device)
    theirs = twin(ours)
    opt, ref = FusedSGD(ours, lr=0.05, **options), torch.optim.SGD(theirs, lr=0.05, **options)
    for step in range(STEPS):
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
    check(ours, theirs, backend, opt, ref)
    assert ours[NEVER].grad is None and torch.equal(ours[NEVER], theirs[NEVER])
    assert all(len(opt.state.get(p, {})) == 0 for p in ours) == (options["momentum"] == 0)


def test_param_groups_scheduler_closure(backend, device):
    ours = make_params(device)
    theirs = twin(ours)
    weights = [torch.randn_like(p) for p in ours]

    def groups(ps):
        return [dict(params=ps[:3], momentum=0.9, nesterov=True, lr=0.02),
                dict(params=ps[3:5], momentum=0.5, dampening=0.3, weight_decay=0.01, maximize=True)]

    opt, ref = FusedSGD(groups(ours), lr=0.1), torch.optim.SGD(groups(theirs), lr=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5) for o in (opt, ref)]
    for step in range(STEPS):
        if step == 6:
            opt.add_param_group(dict(params=ours[5:], momentum=0.8, weight_decay=0.1))
            ref.add_param_group(dict(params=theirs[5:], momentum=0.8, weight_decay=0.1))
        loss, ref_loss = opt.step(closure_for(opt, ours, weights)), ref.step(closure_for(ref, theirs, weights))
        torch.testing.assert_close(loss, ref_loss, **(dict(rtol=0, atol=0) if backend == "torch" else
                                                      dict(rtol=1e-5, atol=1e-5)))
        for s in scheds:
            s.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    check(ours, theirs, backend, opt, ref)


@pytest.mark.parametrize("first", ["fused", "torch"])
def test_state_dict_interchange(backend, device, first):
    """Train 10 steps with one class, continue 10 with the other from its state_dict: the result is torch's."""
    classes = dict(fused=FusedSGD, torch=torch.optim.SGD)
    second = "torch" if first == "fused" else "fused"

    def groups(ps):
        return [dict(params=ps[:4], momentum=0.9, nesterov=True, weight_decay=0.01),
                dict(params=ps[4:], momentum=0.0, lr=0.2)]

    swapped = make_params(device)
    plain = twin(swapped)
    opt, ref = classes[first](groups(swapped), lr=0.05), torch.optim.SGD(groups(plain), lr=0.05)
    for step in range(STEPS):
        if step == STEPS // 2:
            saved = copy.deepcopy(opt.state_dict())
            opt = classes[second](groups(swapped), lr=0.05)
            opt.load_state_dict(saved)
            assert all("momentum_buffer" in opt.state[p] for p in swapped[:4])
        set_grads(step, swapped, plain)
        opt.step()
        ref.step()
    check(swapped, plain, backend, opt, ref)
    state = opt.state_dict()["state"]
    assert set(state) == {0, 1, 2, 3} and all("momentum_buffer" in s for s in state.values())


def test_loads_none_momentum_buffer(backend, device):
    """A state_dict whose momentum_buffer is None (older torch) restarts the buffer, as torch does."""
    ours = make_params(device)
    theirs = twin(ours)
    opt, ref = FusedSGD(ours, lr=0.1, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    saved = opt.state_dict()
    saved["state"] = {i: {"momentum_buffer": None} for i in range(len(SHAPES))}
    opt.load_state_dict(saved)
    for step in range(4):
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
    check(ours, theirs, backend, opt, ref)


def test_tensor_lr(backend, device):
    """A 1-element tensor lr is read at every step: in-place changes (5 steps), then a scheduler (5 steps)."""
    ours = make_params(device)
    theirs = twin(ours)
    lr = torch.tensor(0.1, device=device)
    opt, ref = FusedSGD(ours, lr=lr, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for step in range(5):
        lr.fill_(0.1 / (step + 1))
        ref.param_groups[0]["lr"] = 0.1 / (step + 1)
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref)]
    for step in range(5, 10):
        set_grads(step, ours, theirs)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **KERNEL_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes_mixed_in_one_group(backend, device, dtype):
    """float32 and a half dtype in one group (the kernel: one launch per dtype). The torch path is torch's
    foreach sequence, compared with torch.optim.SGD(foreach=True): in half types torch's for-loop
    implementation (the CPU default) rounds differently from its own foreach one."""
    ours = make_params(device, (torch.float32, dtype))
    theirs, exact = twin(ours), twin(ours, torch.float64)
    options = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt, ref = FusedSGD(ours, **options), torch.optim.SGD(theirs, foreach=True, **options)
    ref64 = torch.optim.SGD(exact, **options)
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        set_grads(0, ours)
        with pytest.raises(RuntimeError, match="bfloat16"):
            opt.step()
    else:
        for step in range(STEPS):
            set_grads(step, ours, theirs, exact)
            for o in (opt, ref, ref64):
                o.step()
        if backend == "torch":
            check(ours, theirs, backend, opt, ref)
        for a, b, r in zip(ours, theirs, exact):
            if a.dtype == torch.float32:
                torch.testing.assert_close(a, b, **(dict(rtol=0, atol=0) if backend == "torch" else
                                                    KERNEL_TOL[a.dtype]))
            else:
                assert (a.double() - r).norm() <= 2 * (b.double() - r).norm() + 1e-3


def test_dtypes_and_layouts_the_kernel_does_not_take_use_foreach_in_the_same_step(backend, device):
    """float64 (the kernel, in float64), complex64 and a strided float32 parameter (those two take the foreach
    path: torch's own ops, exact) beside kernel ones in one group: each result is torch's, buffers included."""
    ours = make_params(device)[:3]
    ours += [torch.randn(5, 3, dtype=torch.float64, device=device).requires_grad_(),
             torch.randn(4, dtype=torch.complex64, device=device).requires_grad_(),
             torch.randn(6, 8, device=device)[:, ::2].requires_grad_()]  # not dense
    theirs = twin(ours)
    options = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    opt, ref = FusedSGD(ours, **options), torch.optim.SGD(theirs, **options)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device, p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if i >= 4 or backend == "torch":
            tol = dict(rtol=0, atol=0)
        else:
            tol = dict(rtol=1e-12, atol=1e-14) if a.dtype == torch.float64 else KERNEL_TOL[torch.float32]
        torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(opt.state[a]["momentum_buffer"], ref.state[b]["momentum_buffer"], **tol)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "learning rate"),
    (dict(lr=torch.tensor([0.1, 0.2])), "1-element"),
    (dict(momentum=-0.5), "momentum"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(nesterov=True), "Nesterov"),
    (dict(nesterov=True, momentum=0.9, dampening=0.1), "Nesterov"),
])
def test_invalid_arguments(kwargs, match):
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=match):
        FusedSGD(params, **kwargs)
    with pytest.raises(ValueError, match=match):
        torch.optim.SGD(params, **kwargs)
    opt = FusedSGD(params)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group(dict(params=[torch.zeros(2, requires_grad=True)], **kwargs))


@pytest.mark.parametrize("name", ["momentum", "dampening", "weight_decay"])
def test_tensor_options_other_than_lr_refused(name):
    with pytest.raises(TypeError, match=name):
        FusedSGD([torch.zeros(3, requires_grad=True)], **{name: torch.tensor(0.1)})


def test_sparse_grad_refused(backend, device):
    p = torch.zeros(4, 3, device=device, requires_grad=True)
    p.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (4, 3), check_invariants=True).to(device)
    with pytest.raises(RuntimeError, match="sparse"):
        FusedSGD([p], lr=0.1).step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device beside the CPU")
def test_mixed_devices_refused(backend):
    params = [torch.zeros(3, device="cuda", requires_grad=True), torch.zeros(3, requires_grad=True)]
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="one device"):
        FusedSGD(params, lr=0.1, momentum=0.9).step()


@pytest.mark.parametrize("cls, group_options", [(FusedSGD, dict(momentum=0.0)), (FusedAdam, dict(amsgrad=True))],
                         ids=["sgd", "adam"])
def test_one_launch_per_group_and_cached_table(monkeypatch, device, cls, group_options):
    """Kernel path: one launch per group and step; the address table is built on the first step only while
    the addresses stay (grads written in place), and rebuilt when a grad is re-allocated."""
    from pyfused.kernels import optimizers

    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    counts = dict(launch=0, build=0)

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(optimizers, "optimizer_step", counted("launch", optimizers.optimizer_step))
    monkeypatch.setattr(optimizers, "make_table", counted("build", optimizers.make_table))
    params = make_params(device)
    for p in params:
        p.grad = torch.ones_like(p)
    opt = cls([dict(params=params[:3]), dict(params=params[3:], **group_options)], lr=0.1,
              **(dict(momentum=0.9) if cls is FusedSGD else {}))
    for _ in range(5):
        opt.step()
    assert counts == dict(launch=10, build=2)
    if cls is FusedAdam:
        assert all(float(opt.state[p]["step"]) == 5 for p in params)
    params[0].grad = torch.ones_like(params[0])
    opt.step()
    assert counts == dict(launch=12, build=3)


def test_auto_backend_runs_the_kernel_for_cuda_only(monkeypatch, device):
    from pyfused.kernels import optimizers

    monkeypatch.setenv("PYFUSED_BACKEND", "auto")
    launches = []
    monkeypatch.setattr(optimizers, "optimizer_step", lambda *args, **kwargs: launches.append(args))
    p = torch.zeros(3, device=device, requires_grad=True)
    p.grad = torch.ones_like(p)
    FusedSGD([p], lr=0.5).step()
    assert len(launches) == int(device == "cuda")
    if device == "cpu":
        assert torch.equal(p, torch.full((3,), -0.5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_sees_tensor_lr(monkeypatch):
    """A step captured in a CUDA graph replays correctly, and sees in-place changes to a tensor lr."""
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    ours = make_params("cuda")[:3]
    theirs = twin(ours)
    for p in ours + theirs:
        p.grad = torch.zeros_like(p)
    lr = torch.tensor(0.1, device="cuda")
    opt, ref = FusedSGD(ours, lr=lr, momentum=0.9), torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for step in range(6):
        lr.fill_(0.1 / (step + 1))
        ref.param_groups[0]["lr"] = 0.1 / (step + 1)
        for a, b in zip(ours, theirs):
            a.grad.copy_(torch.randn_like(a))
            b.grad.copy_(a.grad)
        graph.replay()
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **KERNEL_TOL[torch.float32])


def test_tables_used_by_a_capture_stay_alive(monkeypatch):
    """A captured launch bakes in its address table: a later eager step that rebuilds the table must keep the old
    one alive (replays still read it), and building a table during capture is refused (its host copy and the
    first-step flags would be baked into the graph). Capture is simulated on the interpreter."""
    import gc
    import weakref

    from pyfused import optim

    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    capturing = [False]
    monkeypatch.setattr(optim, "capturing", lambda device: capturing[0])
    params = make_params("cpu")[:3]
    opt = FusedSGD(params, lr=0.1, momentum=0.9)
    set_grads(0, params)
    opt.step()  # the first step: momentum buffers and the table, before capture
    capturing[0] = True
    opt.step()  # "captured": reads the cached table
    captured = weakref.ref(opt._tables[0][1][0].rows)
    capturing[0] = False
    params[0].grad = params[0].grad.clone()  # a new gradient address: the next eager step rebuilds the table
    opt.step()
    gc.collect()
    assert captured() is not None and opt._tables[0][1][0].rows is not captured()
    capturing[0] = True
    params[0].grad = params[0].grad.clone()
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        opt.step()


def test_step_hooks_and_the_profiler_see_the_step(backend, device):
    """The step runs torch.optim's wrapper whenever a hook is registered or the profiler is on (else it skips it):
    pre- and post-hooks (the optimizer's and a global one) run in torch's order around the closure, and the
    profiler shows torch's ``Optimizer.step#<class>.step`` range."""
    from torch.optim import optimizer as torch_optimizer

    p = torch.randn(5, device=device).requires_grad_()
    p.grad = torch.ones_like(p)
    opt = FusedSGD([p], lr=0.1)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    glob = torch_optimizer.register_optimizer_step_post_hook(lambda o, args, kwargs: calls.append("global"))
    try:
        opt.step(lambda: calls.append("closure") or 1.0)
    finally:
        glob.remove()
    assert calls == ["pre", "closure", "post", "global"]
    pre.remove()
    post.remove()
    before = p.detach().clone()
    opt.step()  # no hook: the direct path still updates
    torch.testing.assert_close(p.detach(), before - 0.1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    assert any(e.name == "Optimizer.step#FusedSGD.step" for e in prof.events())


def test_zero_grad_is_torchs(backend, device):
    """set_to_none drops every gradient; set_to_none=False zeroes them in place (the same tensors); the profiler
    sees torch's ``Optimizer.zero_grad#<class>.zero_grad`` range."""
    params = [torch.randn(4, 3, device=device).requires_grad_(), torch.randn(3, device=device).requires_grad_()]
    opt = FusedSGD(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
    assert all(p.grad is None for p in params)
    assert any(e.name == "Optimizer.zero_grad#FusedSGD.zero_grad" for e in prof.events())
