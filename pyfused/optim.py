"""FusedSGD, FusedAdam and FusedAdamW: torch.optim.SGD / Adam / AdamW with one fused launch per param group and
dtype on the Triton path, and torch's own foreach ops on the torch path.

Semantics, defaults, validation (with torch's error messages), param groups, closures and state are torch's:
``state[p]["momentum_buffer"]`` for SGD (absent while momentum is 0); ``step``, ``exp_avg``, ``exp_avg_sq`` (and
``max_exp_avg_sq`` with amsgrad) for Adam, so state_dicts load into the torch optimizers and back. The math is
written once, in :mod:`pyfused.kernels.optimizers` (kernels) and :mod:`pyfused.torch_ops` (its twins).

Triton path: every parameter of a group is updated by one launch of
:func:`pyfused.kernels.optimizers.optimizer_kernel` per parameter dtype, driven by a device table of addresses
(cached per group, rebuilt only when an address changes: keep ``zero_grad(set_to_none=False)`` for addresses that
never change) and a float64 device row of hyper-parameters (rewritten only when a value changes). Adam's ``step``
lives on the parameters' device and the kernel advances it, so a step allocates nothing and never synchronises
with the host. Parameters the kernel does not take (complex, not dense, their gradient laid out differently)
take the foreach path in the same step.
"""
from __future__ import annotations

import torch

from pyfused import backend, torch_ops

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _no_tensor(**options) -> None:
    for name, value in options.items():
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a float (only lr may be a tensor), got a tensor")


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


def _check_sgd(lr, momentum, dampening, weight_decay, nesterov, **_) -> None:
    """What torch.optim.SGD refuses, with its messages; and tensors where only lr may be one."""
    _no_tensor(momentum=momentum, dampening=dampening, weight_decay=weight_decay)
    _check_lr(lr)
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def _check_flags(name, foreach=None, fused=None, differentiable=False, **_) -> None:
    """torch's constructor flags, accepted so that code written for torch.optim runs unchanged: ``foreach``,
    ``fused`` and ``capturable`` choose among torch's implementations (pyfused has one: fused, capturable, its
    step count on the device), torch's combinations that fail fail the same way; ``differentiable`` is refused."""
    if fused and differentiable:
        raise RuntimeError("`fused` does not support `differentiable`")
    if fused and foreach:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if differentiable:
        raise RuntimeError(f"pyfused.{name} does not support differentiable=True (its update is not a graph of "
                           f"differentiable ops); use torch.optim.{name[5:]}")


def _check_adam(lr, betas, eps, weight_decay, foreach=None, capturable=False, **_) -> None:
    """What torch.optim.Adam refuses, with its messages (betas floats or 1-element tensors, read on the host)."""
    _no_tensor(eps=eps, weight_decay=weight_decay)
    if isinstance(lr, torch.Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    _check_lr(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory span exactly once (contiguous up to a permutation of dimensions)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def kernel_takes(p, grad, states) -> bool:
    """Whether the kernel updates ``p``: a dtype of :data:`KERNEL_DTYPES`, dense, its grad and states of the same
    dtype and strides. Others (complex, strided, a gradient laid out differently) take the foreach path."""
    return p.dtype in KERNEL_DTYPES and _dense(p) and all(
        t is None or (t.dtype == p.dtype and t.stride() == p.stride()) for t in (grad, *states))


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a graph (never on other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def kernel_lr(lr, device):
    """``lr`` as the kernel takes it: a float, or a 1-element tensor on the parameters' device."""
    if not isinstance(lr, torch.Tensor) or lr.device == device:
        return lr
    if lr.device.type == "cpu":
        return float(lr)
    raise RuntimeError(f"lr tensor must be on the parameters' device ({device}) or the CPU, got {lr.device}")


def _hooked_step(update):
    """``step``, marked as torch's wrapper marks a patched step (``hooked``, so torch.optim leaves it as it is):
    ``update`` run directly when no step hook is registered (global or on the optimizer) and the profiler is
    off, else through torch's own wrapper (:meth:`torch.optim.Optimizer.profile_hook_step`), so that hooks and
    profiles see what torch.optim's optimizers show."""
    from torch.optim import optimizer as torch_optimizer

    wrapped = torch.optim.Optimizer.profile_hook_step(update)

    def step(self, closure=None):
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks
                or torch._C._autograd._profiler_enabled()):
            return wrapped(self, closure)
        out = update(self, closure)
        self._optimizer_step_code()
        return out

    step.__doc__, step.hooked = update.__doc__, True
    return step


class _FusedOptimizer(torch.optim.Optimizer):
    """The machinery the fused optimizers share: gathering a group's parameters with gradients, the split between
    the kernel and the foreach path, the cached address tables (kept alive for CUDA graphs) and the device
    hyper-parameter rows. A subclass names its kernel math (``KIND``) and gives its states, its row and its
    foreach update."""

    KIND = "sgd"
    GROUP_DEFAULTS = {}  # options a loaded state may lack, and their defaults

    def __init__(self, params, defaults):
        self._tables = {}  # group index -> (address key, tables, used by a CUDA-graph capture)
        self._captured_tables = []  # tables replaced after a capture used them (its replays still read them)
        self._hp = {}  # group index -> (host row, device float64 tensor)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for name in ("_tables", "_hp"):
            self.__dict__.setdefault(name, {})
        self.__dict__.setdefault("_captured_tables", [])
        for group in self.param_groups:  # options added after a state was saved
            for key, value in self.GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, with the group's own options validated as the constructor's are."""
        merged = {**self.defaults, **param_group}
        self._check_options(**merged)
        _check_flags(type(self).__name__, **merged)
        super().add_param_group(param_group)

    @torch.no_grad()
    def _update(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss (or None).

        As ``step``: torch.optim's step wrapper (a profiler range, then the step pre- and post-hooks) runs as
        torch runs it whenever a hook is registered or the profiler is on; otherwise the update runs directly,
        ~5 µs less per step (:func:`_hooked_step`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            device = params[0].device
            for i, (p, g) in enumerate(zip(params, grads)):
                if g.layout != torch.strided:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (got layout "
                                       f"{g.layout}); use torch.optim.{type(self).__name__[5:]}")
                if p.device != device or g.device != device:
                    raise RuntimeError(f"{type(self).__name__} needs each param group on one device: parameter {i} "
                                       f"is on {p.device}, the group's first parameter on {device}")
            rest = list(range(len(params)))
            if backend.use_triton(device):
                takes = [kernel_takes(p, g, self._existing_states(p)) for p, g in zip(params, grads)]
                if any(takes):
                    self._kernel_step(index, group, [p for p, k in zip(params, takes) if k], device)
                rest = [i for i, k in enumerate(takes) if not k]
            if rest:
                self._foreach_step(group, [params[i] for i in rest], [grads[i] for i in rest])
        return loss

    step = _hooked_step(_update)

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; with ``set_to_none`` (its default) and the profiler off, the gradients are
        dropped without torch's profiler range (measured ~8 µs per call less at the seed step)."""
        if not set_to_none or torch._C._autograd._profiler_enabled():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    # ------------------------------------------------------------------ what a subclass gives
    def _existing_states(self, p) -> list:
        """The state tensors of ``p`` the kernel would read (those that exist)."""
        raise NotImplementedError

    def _kernel_states(self, group, p, device):
        """``(states, step, fresh)`` for the kernel: up to three state tensors of ``p`` (made where missing), Adam's
        step tensor on ``device`` (else None), whether an SGD buffer is new (no history)."""
        raise NotImplementedError

    def _row(self, group) -> tuple:
        """The group's hyper-parameter row (:mod:`pyfused.kernels.optimizers` layouts)."""
        raise NotImplementedError

    def _flags(self, group) -> dict:
        """The kernel's flags for the group: ``has_state``, ``amsgrad``."""
        raise NotImplementedError

    def _foreach_step(self, group, params, grads) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ the kernel path
    def _kernel_step(self, index, group, params, device):
        from pyfused.kernels import optimizers

        made = [self._kernel_states(group, p, device) for p in params]
        key = tuple((p.data_ptr(), p.grad.data_ptr(), p.numel(), p.dtype,
                     *(s.data_ptr() for s in states), 0 if step is None else step.data_ptr())
                    for p, (states, step, _) in zip(params, made))
        fresh = [f for _, _, f in made]
        cached = self._tables.get(index)
        on_graph = capturing(device)
        if cached is None or cached[0] != key or any(fresh):
            if on_graph:
                raise RuntimeError(
                    f"{type(self).__name__} would build a new address table while a CUDA graph is being captured "
                    "(the first step, new state, or a parameter or gradient at a new address): run one eager step "
                    "before capture and keep the gradients allocated (zero_grad(set_to_none=False))")
            if cached is not None and cached[2]:  # a captured graph reads this table at replay: keep it alive
                self._captured_tables.append(cached)
            cached = self._tables[index] = (key, self._build_tables(optimizers, params, made), False)
        elif on_graph and not cached[2]:
            cached = self._tables[index] = (cached[0], cached[1], True)
        hp = self._hp_tensor(index, group, device)
        lr = kernel_lr(group["lr"], device)
        for table in cached[1]:
            optimizers.optimizer_step(table, hp, optimizer=self.KIND, lr=lr if isinstance(lr, torch.Tensor) else None,
                                      **self._flags(group))

    def _build_tables(self, optimizers, params, made):
        """One table per parameter dtype (first-seen order)."""
        by_dtype = {}
        for i, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(i)
        tables = []
        for dtype, idx in by_dtype.items():
            backend.use_triton(params[0].device, dtype)
            tables.append(optimizers.make_table(
                [params[i] for i in idx], [params[i].grad for i in idx], [made[i][0] for i in idx],
                [made[i][1] for i in idx], [None] * len(idx), [0] * len(idx), [made[i][2] for i in idx], self.KIND))
        return tables

    def _hp_tensor(self, index, group, device):
        """The group's float64 device row, rewritten (one host→device copy) when a value changed."""
        lr = group["lr"]
        row = (0.0 if isinstance(lr, torch.Tensor) and lr.device == device else float(lr), *self._row(group))
        cached = self._hp.get(index)
        if cached is None or cached[0] != row or cached[1].device != device:
            from pyfused.kernels.optimizers import HP_WIDTH

            host = torch.tensor([row + (0.0,) * (HP_WIDTH.value - len(row))], dtype=torch.float64)
            tensor = cached[1] if cached is not None and cached[1].device == device else \
                torch.empty_like(host, device=device)
            tensor.copy_(host.pin_memory() if device.type == "cuda" else host, non_blocking=True)
            cached = self._hp[index] = (row, tensor)
        return cached[1]


class FusedSGD(_FusedOptimizer):
    """torch.optim.SGD's semantics, defaults and state, each param group updated by one fused launch per dtype.

    Args: as torch.optim.SGD (``params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
    *, maximize=False``; torch's ``foreach`` and ``fused`` are accepted and change nothing, ``differentiable=True``
    is refused). ``lr`` may be a 1-element tensor: the kernel reads it on the device at every step
    (a captured CUDA graph then sees schedule changes); it must live on the parameters' device or the CPU.
    Kernel path: dense float32, float16, bfloat16 and float64 parameters (others, e.g. complex or strided, take
    the foreach path in the same step), each group on one device, math in float32 (float64 for float64). Sparse
    gradients are refused.

    CUDA graphs: a captured step replays the launch with the address table it read. Run the first step (which
    makes the momentum buffers and the table) eagerly before capture, and keep the gradients at fixed addresses
    (``zero_grad(set_to_none=False)``); a step that would build a new table during capture raises. A table a
    capture used stays alive when a later eager step replaces it, so replays never read freed memory.
    """

    KIND = "sgd"
    GROUP_DEFAULTS = dict(nesterov=False, maximize=False)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        _check_sgd(lr, momentum, dampening, weight_decay, nesterov)
        _check_flags("FusedSGD", foreach, fused, differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults)

    _check_options = staticmethod(_check_sgd)

    def _existing_states(self, p):
        buf = self.state.get(p, {}).get("momentum_buffer")
        return [] if buf is None else [buf]

    def _kernel_states(self, group, p, device):
        if group["momentum"] == 0:
            return [], None, False
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            return [state["momentum_buffer"]], None, True
        return [buf], None, False

    def _row(self, group):
        return (float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
                float(bool(group["nesterov"])), -1.0 if group["maximize"] else 1.0)

    def _flags(self, group):
        return dict(has_state=group["momentum"] != 0)

    def _foreach_step(self, group, params, grads):
        momentum = group["momentum"]
        buffers = [self.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        torch_ops.sgd_foreach(params, grads, buffers, lr=group["lr"], momentum=momentum,
                              dampening=group["dampening"], weight_decay=group["weight_decay"],
                              nesterov=group["nesterov"], maximize=group["maximize"])
        for p, buf in zip(params, buffers):
            self.state[p]["momentum_buffer"] = buf


class FusedAdam(_FusedOptimizer):
    """torch.optim.Adam's semantics, defaults and state, each param group updated by one fused launch per dtype.

    Args: as torch.optim.Adam (``params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
    *, maximize=False``; torch's ``foreach``, ``capturable`` and ``fused`` are accepted and change nothing,
    ``differentiable=True`` is refused); ``lr`` may be a 1-element tensor, betas 1-element tensors (read on the
    host at each step). State per parameter: ``step`` (a float32 0-dim tensor —
    on the parameters' device on the kernel path, which advances it there, as torch's ``fused=True`` keeps it;
    on the CPU on the torch path, as torch's default), ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq`` (amsgrad).
    state_dicts load into torch.optim.Adam and back. Kernel math in float32 (float64 for float64), the bias
    corrections in float64 as torch computes them; CUDA graphs as for :class:`FusedSGD`.
    """

    KIND = "adam"
    DECOUPLED = False
    GROUP_DEFAULTS = dict(amsgrad=False, maximize=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        _check_adam(lr, betas, eps, weight_decay, foreach, capturable)
        _check_flags(type(self).__name__, foreach, fused, differentiable)
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=self.DECOUPLED)
        super().__init__(params, defaults)

    _check_options = staticmethod(_check_adam)

    def _decoupled(self, group) -> bool:
        """AdamW's decoupled weight decay (also a torch Adam state with ``decoupled_weight_decay`` loaded here)."""
        return bool(group.get("decoupled_weight_decay", self.DECOUPLED))

    def _existing_states(self, p):
        state = self.state.get(p, {})
        return [state[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in state]

    def _init_state(self, group, p, step_device):
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _kernel_states(self, group, p, device):
        state = self._init_state(group, p, device)
        step = state["step"]
        if not isinstance(step, torch.Tensor) or step.device != device or step.dtype != torch.float32:
            step = state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)
        names = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        return [state[k] for k in names], step, False

    def _row(self, group):
        beta1, beta2 = group["betas"]
        return (float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                -1.0 if group["maximize"] else 1.0, float(self._decoupled(group)))

    def _flags(self, group):
        return dict(has_state=True, amsgrad=bool(group["amsgrad"]))

    def _foreach_step(self, group, params, grads):
        states = [self._init_state(group, p, "cpu") for p in params]
        for state, p in zip(states, params):
            if not isinstance(state["step"], torch.Tensor):
                state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32)
        beta1, beta2 = (float(b) for b in group["betas"])
        torch_ops.adam_foreach(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                               [s.get("max_exp_avg_sq") for s in states], [s["step"] for s in states],
                               lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                               weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                               maximize=group["maximize"], decoupled=self._decoupled(group))


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW: :class:`FusedAdam` with decoupled weight decay (``p = p·(1 − lr·λ)`` before the moments),
    default ``weight_decay=1e-2``. state_dicts load into torch.optim.AdamW and back."""

    DECOUPLED = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         capturable=capturable, differentiable=differentiable, fused=fused)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    def _decoupled(self, group) -> bool:
        return True
