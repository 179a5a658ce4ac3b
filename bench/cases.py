"""What is timed (cases), the ways of running it (implementations), and the correctness gate before timing.

Cases, on fixed inputs ``x`` (B, in), ``target`` (B,) and ``dy`` (B, out) of the benchmark dtype:

- ``forward``: log-probabilities ``log_softmax(fc2(relu(fc1(x))), 1)`` under ``torch.no_grad()``;
- ``fwd_bwd``: the same with autograd, then ``torch.autograd.grad(y, params, dy)`` (parameter gradients);
- ``loss``: ``loss = nll(model(x), target)`` (mean) and ``torch.autograd.grad(loss, params)``;
- ``optimizer``: one ``optimizer.step()`` on fixed gradients (SGD, lr 0.15, the config's momentum);
- ``train_step``: ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` after the loss — the seed's
  training step, the case that matters most.

The model is the seed's (``SeedNet``: two nn.Linear, no bias unless asked) or pyfused's ``FusedMLP`` sharing
the same initial parameters. ``torch.compile`` follows PyTorch's recipe: the model or loss function and
``optimizer.step`` are compiled separately (``dynamic=False``); backward runs the compiled backward.
CUDA-graph implementations capture the eager call after three warm-up calls on a side stream, as in
PyTorch's "whole-network capture" example, and replay it; the pyfused one zeroes gradients with
``zero_grad(set_to_none=False)`` (FusedSGD caches gradient addresses), the others with the seed's ``zero_grad()``.
``fused_train_step_cudagraph`` uses FusedTrainStep's own ``capture``, whose replay copies x and target in.

Correctness gate (:func:`mismatch`): after a reset to the initial parameters (and zero momentum buffers, which
SGD with dampening 0 treats like absent ones), one call's outputs and the parameters after it are compared
with eager PyTorch's. float32 (IEEE): ``assert_close(rtol=1e-4, atol=1e-5)``. TF32 and bfloat16, whose
rounding legitimately differs between correct kernels: against a float64 run of the same inputs,
``max|impl − fp64| ≤ 4·max|eager − fp64| + eps·max|fp64|`` (eps of the dtype), per output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pyfused.modules import FusedMLP

CASES = ("forward", "fwd_bwd", "loss", "optimizer", "train_step")
OPTIMIZER_CASES = ("optimizer", "train_step")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
LR = 0.15
SEED = 420
WARMUP_CALLS = 3
FP32_TOL = dict(rtol=1e-4, atol=1e-5)
EAGER_ERROR_FACTOR = 4


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark point. ``momentum`` is None for the cases without an optimizer."""

    case: str
    batch: int
    n_in: int
    hidden: int
    n_out: int
    dtype: str
    momentum: float | None
    bias: bool

    def param_names(self) -> list[str]:
        names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
        return names if self.bias else names[::2]

    def labels(self) -> list[str]:
        """Names of the tensors that :func:`snapshot` returns: the call's outputs, then the parameters."""
        grads = [f"grad {n}" for n in self.param_names()]
        outputs = {"forward": ["y"], "fwd_bwd": grads, "loss": ["loss", *grads], "optimizer": [],
                   "train_step": ["loss"]}[self.case]
        return outputs + [f"{n} after the call" for n in self.param_names()]


class SeedNet(nn.Module):
    """The seed's model: ``log_softmax(fc2(relu(fc1(x.view(-1, in)))), dim=1)`` with nn.Linear layers."""

    def __init__(self, n_in: int, hidden: int, n_out: int, bias: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden, bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, n_out, bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(F.relu(self.fc1(x.view(-1, self.fc1.in_features)))), dim=1)


@contextlib.contextmanager
def precision(dtype: str):
    """CUDA float32 matmul precision for a benchmark dtype: TF32 for ``"tf32"``, IEEE otherwise; restored after.

    Set through ``torch.backends.cuda.matmul.fp32_precision``, the API PyTorch recommends (the legacy
    ``allow_tf32`` raises once the new one was used); torch.compile, eager matmuls and pyfused's launchers
    (:func:`pyfused.kernels.launch.cuda_tf32_enabled`) all read it."""
    matmul = torch.backends.cuda.matmul
    wanted = "tf32" if dtype == "tf32" else "ieee"
    if not hasattr(matmul, "fp32_precision"):  # a torch without the new API
        saved = matmul.allow_tf32
        matmul.allow_tf32 = wanted == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = saved
        return
    saved = matmul.fp32_precision
    matmul.fp32_precision = wanted
    try:
        yield
    finally:
        matmul.fp32_precision = saved


@dataclasses.dataclass
class Inputs:
    """Fixed data of one config: x, target, dy, the initial parameters and, for ``optimizer``, the gradients."""

    x: torch.Tensor
    target: torch.Tensor
    dy: torch.Tensor
    init: list
    grads: list

    def to(self, dtype: torch.dtype) -> "Inputs":
        """The same values in ``dtype`` (the float64 reference runs on the rounded inputs)."""
        return Inputs(self.x.to(dtype), self.target, self.dy.to(dtype), [t.to(dtype) for t in self.init],
                      [t.to(dtype) for t in self.grads])


def make_inputs(cfg: Config, device: torch.device) -> Inputs:
    """Seeded inputs: x ~ N(0, 1), uniform targets, dy ~ N(0, 1)/B, nn.Linear's default init, grads ~ N(0, 0.01²)."""
    gen = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        init = [p.detach() for p in SeedNet(cfg.n_in, cfg.hidden, cfg.n_out, cfg.bias).parameters()]
    grads = [torch.randn(p.shape, generator=gen) * 0.01 for p in init] if cfg.case == "optimizer" else []
    x = torch.randn(cfg.batch, cfg.n_in, generator=gen)
    target = torch.randint(0, cfg.n_out, (cfg.batch,), generator=gen)
    dy = torch.randn(cfg.batch, cfg.n_out, generator=gen) / cfg.batch
    dtype = DTYPES[cfg.dtype]
    move = functools.partial(torch.Tensor.to, device=device, dtype=dtype)
    return Inputs(move(x), target.to(device), move(dy), [move(t) for t in init], [move(t) for t in grads])


@dataclasses.dataclass
class Runner:
    """A built implementation: ``work()`` is one timed call and returns the outputs the gate compares."""

    work: Callable[[], tuple]
    params: list
    optimizer: object = None

    def reset(self, inputs: Inputs) -> None:
        """Back to the initial parameters, momentum buffers zeroed in place (CUDA graphs keep their addresses)."""
        with torch.no_grad():
            for p, value in zip(self.params, inputs.init):
                p.copy_(value)
            for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].zero_()


def _case_work(case, model, loss_of, optimizer, inputs, params, set_to_none=True):
    x, target, dy = inputs.x, inputs.target, inputs.dy
    if case == "forward":
        def work():
            with torch.no_grad():
                return (model(x),)
    elif case == "fwd_bwd":
        def work():
            return torch.autograd.grad(model(x), params, dy)
    elif case == "loss":
        def work():
            loss = loss_of(x, target)
            return (loss.detach(), *torch.autograd.grad(loss, params))
    elif case == "optimizer":
        def work():
            optimizer.step()
            return ()
    else:
        def work():
            loss = loss_of(x, target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
            return (loss.detach(),)
    return work


def _cuda_graph(work):
    """Capture ``work`` after warm-up calls on a side stream; the replay returns the graph's static outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = work()

    def replay():
        graph.replay()
        return outputs
    return replay


class _CompiledStep:
    """An optimizer whose ``step`` is compiled and whose ``zero_grad`` and ``state`` are the optimizer's own."""

    def __init__(self, optimizer, mode):
        self.state = optimizer.state
        self.zero_grad = optimizer.zero_grad
        self.step = torch.compile(lambda: optimizer.step(), mode=mode, dynamic=False)


def _sgd(kind, params, momentum):
    if kind == "pyfused":
        from pyfused.optim import FusedSGD
        return FusedSGD(params, lr=LR, momentum=momentum)
    options = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[kind]
    return torch.optim.SGD(params, lr=LR, momentum=momentum, **options)


def build(cfg: Config, inputs: Inputs, family: str, sgd: str = "default", wrap: str = "eager",
          mode: str | None = None) -> Runner:
    """A Runner for ``cfg`` on ``inputs`` (their device and dtype).

    family ``"torch"`` (SeedNet + F.nll_loss) or ``"pyfused"`` (FusedMLP + its fused ``nll_loss``); ``sgd``
    ``"default"``, ``"foreach"``, ``"fused"`` (torch.optim.SGD) or ``"pyfused"`` (FusedSGD); ``wrap``
    ``"eager"``, ``"compile"`` (torch.compile ``mode``), ``"cudagraph"``, ``"train_step"`` (FusedTrainStep) or
    ``"train_step_cudagraph"`` (FusedTrainStep after its ``capture``).
    """
    net = SeedNet(cfg.n_in, cfg.hidden, cfg.n_out, cfg.bias, device=inputs.x.device, dtype=inputs.x.dtype)
    model = net if family == "torch" else FusedMLP.from_linear(net.fc1, net.fc2)
    params = list(model.parameters())
    optimizer = _sgd(sgd, params, cfg.momentum) if cfg.case in OPTIMIZER_CASES else None
    runner = Runner(None, params, optimizer)
    runner.reset(inputs)
    if cfg.case == "optimizer":
        for p, g in zip(params, inputs.grads):
            p.grad = g.clone()
    if family == "torch":
        def loss_of(x, target):
            return F.nll_loss(net(x), target)
    else:
        loss_of = model.nll_loss
    if wrap in ("train_step", "train_step_cudagraph"):
        from pyfused.train_step import FusedTrainStep
        step = FusedTrainStep(model, optimizer)
        if wrap == "train_step_cudagraph":
            step.capture(inputs.x, inputs.target)
        runner.work = lambda: (step(inputs.x, inputs.target),)
        return runner
    if wrap == "compile":
        compiled = functools.partial(torch.compile, mode=mode, dynamic=False)
        model, loss_of = compiled(model), compiled(loss_of)
        optimizer = _CompiledStep(optimizer, mode) if optimizer is not None else None
    # FusedSGD caches its parameters' and gradients' addresses: in a captured graph the gradients must keep theirs
    set_to_none = not (family == "pyfused" and wrap == "cudagraph")
    work = _case_work(cfg.case, model, loss_of, optimizer, inputs, params, set_to_none)
    if wrap == "cudagraph":
        work = _cuda_graph(work)
    elif mode == "reduce-overhead":
        step_work = work

        def work():
            torch.compiler.cudagraph_mark_step_begin()
            return step_work()
    runner.work = work
    return runner


@dataclasses.dataclass(frozen=True)
class Impl:
    """An implementation: ``make(cfg, inputs) → Runner``, the cases it runs, the devices it needs and the
    modules it needs (``requires`` always; ``step_requires`` for the optimizer cases)."""

    name: str
    description: str
    make: Callable[[Config, Inputs], Runner]
    cases: tuple = CASES
    devices: tuple = ("cpu", "cuda")
    requires: tuple = ()
    step_requires: tuple = ()

    def unavailable(self, case: str, device: str) -> str | None:
        """Why this implementation is not listed for ``case`` on ``device``; None when it is."""
        if case not in self.cases:
            return f"does not apply to {case}"
        if device not in self.devices:
            return f"needs {' or '.join(self.devices)}"
        for module in self.requires + (self.step_requires if case in OPTIMIZER_CASES else ()):
            problem = _import_problem(module)
            if problem:
                return f"{module} is not importable ({problem})"
        return None


@functools.cache
def _import_problem(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except ImportError as error:
        return str(error)
    return None


def _impl(name, description, family, sgd="default", wrap="eager", mode=None, **kw) -> Impl:
    return Impl(name, description, functools.partial(build, family=family, sgd=sgd, wrap=wrap, mode=mode), **kw)


PYFUSED_STEP = ("pyfused.optim",)
IMPLS = (
    _impl("eager", "seed nn.Linear model + torch.optim.SGD defaults (foreach on CUDA, for-loop on CPU)", "torch"),
    _impl("eager_foreach", "eager + SGD(foreach=True) (the CUDA default, so listed on CPU only)", "torch",
          sgd="foreach", cases=OPTIMIZER_CASES, devices=("cpu",)),
    _impl("eager_fused_sgd", "eager + SGD(fused=True)", "torch", sgd="fused", cases=OPTIMIZER_CASES),
    _impl("compile_default", "torch.compile, default mode", "torch", wrap="compile"),
    _impl("compile_max_autotune", "torch.compile, max-autotune-no-cudagraphs", "torch", wrap="compile",
          mode="max-autotune-no-cudagraphs", devices=("cuda",)),
    _impl("compile_reduce_overhead", "torch.compile, reduce-overhead (CUDA graphs)", "torch", wrap="compile",
          mode="reduce-overhead", devices=("cuda",)),
    _impl("eager_cudagraph", "eager captured in one CUDA graph", "torch", wrap="cudagraph", devices=("cuda",)),
    _impl("pyfused", "FusedMLP (+ fused nll_loss) + FusedSGD", "pyfused", sgd="pyfused",
          step_requires=PYFUSED_STEP),
    _impl("pyfused_cudagraph", "pyfused captured in one CUDA graph", "pyfused", sgd="pyfused", wrap="cudagraph",
          devices=("cuda",), step_requires=PYFUSED_STEP),
    _impl("fused_train_step", "pyfused.FusedTrainStep(FusedMLP, FusedSGD)", "pyfused", sgd="pyfused",
          wrap="train_step", cases=("train_step",), requires=("pyfused.train_step",) + PYFUSED_STEP),
    _impl("fused_train_step_cudagraph", "FusedTrainStep after step.capture(x, target) (its CUDA graph)", "pyfused",
          sgd="pyfused", wrap="train_step_cudagraph", cases=("train_step",), devices=("cuda",),
          requires=("pyfused.train_step",) + PYFUSED_STEP),
)
PYFUSED_IMPLS = ("pyfused", "pyfused_cudagraph", "fused_train_step", "fused_train_step_cudagraph")


def snapshot(runner: Runner) -> list:
    """One call's outputs and the parameters after it, cloned (CUDA-graph outputs are overwritten later)."""
    outputs = runner.work()
    return [t.detach().clone() for t in outputs] + [p.detach().clone() for p in runner.params]


@dataclasses.dataclass
class Reference:
    """Eager PyTorch's snapshot in the benchmark dtype, and in float64 for TF32 and bfloat16 (else None)."""

    eager: list
    exact: list | None


def reference(cfg: Config, inputs: Inputs) -> Reference:
    eager = snapshot(build(cfg, inputs, "torch"))
    exact = None if cfg.dtype == "fp32" else snapshot(build(cfg, inputs.to(torch.float64), "torch"))
    return Reference(eager, exact)


def mismatch(cfg: Config, got: list, ref: Reference) -> str | None:
    """Why ``got`` (a :func:`snapshot`) is not eager's result to the dtype's tolerance; None when it is."""
    if len(got) != len(ref.eager):
        return f"returned {len(got)} tensors, eager {len(ref.eager)}"
    for i, (name, value, eager) in enumerate(zip(cfg.labels(), got, ref.eager)):
        if value.shape != eager.shape:
            return f"{name}: shape {tuple(value.shape)}, eager {tuple(eager.shape)}"
        if ref.exact is None:
            try:
                torch.testing.assert_close(value, eager, **FP32_TOL)
            except AssertionError as error:
                return f"{name}: " + " ".join(str(error).split())
            continue
        exact = ref.exact[i]
        error = (value.double() - exact).abs().max()
        bound = EAGER_ERROR_FACTOR * (eager.double() - exact).abs().max() \
            + torch.finfo(eager.dtype).eps * exact.abs().max()
        if not (error <= bound):
            return f"{name}: max |error| vs float64 {float(error):.3g} > {float(bound):.3g} (4×eager's + eps)"
    return None
