"""FusedSGD: torch.optim.SGD (momentum, dampening, Nesterov, weight decay, maximize) with a fused update.

Per parameter, with lr ``η``, momentum ``γ``, dampening ``τ`` and weight decay ``λ``::

    g = −grad if maximize else grad;  g = g + λ·p
    b = g on the first step, else γ·b + (1 − τ)·g;  g = g + γ·b if nesterov else b      (γ ≠ 0 only)
    p = p − η·g

The state is ``state[p]["momentum_buffer"]`` (a tensor like ``p``, absent while γ = 0), exactly torch's, so
state_dicts interchange with torch.optim.SGD in both directions.

Backends (:mod:`pyfused.backend`): on the Triton path every parameter of a group is updated by one launch of
:func:`pyfused.kernels.sgd.sgd_kernel` per parameter dtype, math in float32, driven by a device table of
addresses that is cached per group and rebuilt only when a parameter, grad or buffer address changes (keep
``zero_grad(set_to_none=False)`` for addresses that never change); a step then allocates nothing and never
synchronises with the host. On the torch path the update is the ``torch._foreach_*`` sequence of
torch.optim.SGD's foreach implementation (math in the parameter dtype), without its grouping overhead and
without writing into ``.grad``.
"""
from __future__ import annotations

import torch

from pyfused import backend

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_options(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """Raise on what torch.optim.SGD refuses (same cases), and on tensors where only lr may be one."""
    for name, value in (("momentum", momentum), ("dampening", dampening), ("weight_decay", weight_decay)):
        if isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a float (only lr may be a tensor), got a tensor")
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if lr < 0.0:
        raise ValueError(f"Invalid learning rate: lr must be >= 0, got {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: momentum must be >= 0, got {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: weight_decay must be >= 0, got {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"Nesterov momentum requires a momentum and zero dampening, got momentum={momentum}, "
            f"dampening={dampening}"
        )


class FusedSGD(torch.optim.Optimizer):
    """torch.optim.SGD's semantics, defaults and state, each param group updated by one fused launch.

    Args: as torch.optim.SGD (``params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
    *, maximize=False``). ``lr`` may be a 1-element tensor: the kernel reads it on the device at every step
    (a captured CUDA graph then sees schedule changes); it must live on the parameters' device or the CPU.
    Kernel path: dense float32, float16 and bfloat16 parameters (others, e.g. float64 or complex, take the foreach
    path in the same step), each group on one device. Sparse gradients are refused.

    CUDA graphs: a captured step replays the launch with the address table it read. Run the first step (which
    makes the momentum buffers and the table) eagerly before capture, and keep the gradients at fixed addresses
    (``zero_grad(set_to_none=False)``); a step that would build a new table during capture raises. A table a
    capture used stays alive when a later eager step replaces it, so replays never read freed memory.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False):
        _check_options(lr, momentum, dampening, weight_decay, nesterov)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        self._tables = {}  # group index -> (address key, tables, used by a CUDA-graph capture)
        self._captured_tables = []  # tables replaced after a capture used them (its replays still read them)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
        self.__dict__.setdefault("_tables", {})
        self.__dict__.setdefault("_captured_tables", [])

    def add_param_group(self, param_group: dict) -> None:
        """torch's ``add_param_group``, with the group's own options validated as the constructor's are."""
        merged = {**self.defaults, **param_group}
        _check_options(*(merged[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")))
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns ``closure()``'s loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params, grads, buffers = self._gather(group)
            if not params:
                continue
            device = params[0].device
            for i, (p, g, b) in enumerate(zip(params, grads, buffers or [None] * len(params))):
                for name, t in (("parameter", p), ("grad", g), ("momentum_buffer", b)):
                    if t is not None and t.device != device:
                        raise RuntimeError(f"FusedSGD needs each param group on one device: {name} {i} is on "
                                           f"{t.device}, the group's first parameter on {device}")
            rest = list(range(len(params)))
            if backend.use_triton(device):
                takes = [_kernel_takes(p, g, b) for p, g, b in zip(params, grads, buffers or [None] * len(params))]
                if any(takes):
                    pick = lambda items: [t for t, k in zip(items, takes) if k]  # noqa: E731
                    self._kernel_step(index, group, pick(params), pick(grads), pick(buffers), device)
                rest = [i for i, k in enumerate(takes) if not k]  # e.g. float64: the foreach path, same step
            if rest:
                self._foreach_step(group, [params[i] for i in rest], [grads[i] for i in rest],
                                   [buffers[i] for i in rest] if buffers else [])
        return loss

    def _foreach_step(self, group, params, grads, buffers):
        _foreach_sgd(params, grads, buffers, lr=group["lr"], momentum=group["momentum"],
                     dampening=group["dampening"], weight_decay=group["weight_decay"],
                     nesterov=group["nesterov"], maximize=group["maximize"])
        if group["momentum"] != 0:
            for p, buf in zip(params, buffers):
                self.state[p]["momentum_buffer"] = buf

    def _gather(self, group):
        """The group's parameters that have a gradient, their gradients, and their momentum buffers (None
        where there is none yet; an empty list while momentum is 0)."""
        momentum = group["momentum"] != 0
        params, grads, buffers = [], [], []
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.layout != torch.strided:
                raise RuntimeError(f"FusedSGD does not support sparse gradients (got layout {grad.layout}); "
                                   "use torch.optim.SGD")
            params.append(p)
            grads.append(grad)
            if momentum:
                buffers.append(self.state[p].get("momentum_buffer"))
        return params, grads, buffers

    def _kernel_step(self, index, group, params, grads, buffers, device):
        """One launch per parameter dtype of the group, with the cached address table when still valid."""
        from pyfused.kernels import sgd

        momentum = group["momentum"]
        fresh = [False] * len(params)
        if momentum != 0:
            for i, (p, buf) in enumerate(zip(params, buffers)):
                if buf is None:
                    buffers[i] = torch.empty_like(p, memory_format=torch.preserve_format)
                    fresh[i] = True
        else:
            buffers = [None] * len(params)
        key = tuple((p.data_ptr(), g.data_ptr(), 0 if b is None else b.data_ptr(), p.numel(), p.dtype)
                    for p, g, b in zip(params, grads, buffers))
        cached = self._tables.get(index)
        capturing = _capturing(device)
        if cached is None or cached[0] != key or any(fresh):
            if capturing:
                raise RuntimeError(
                    "FusedSGD would build a new address table while a CUDA graph is being captured (the first step, "
                    "a new momentum buffer, or a parameter or gradient at a new address): run one eager step before "
                    "capture and keep the gradients allocated (zero_grad(set_to_none=False))")
            if cached is not None and cached[2]:  # a captured graph reads this table at replay: keep it alive
                self._captured_tables.append(cached)
            cached = self._tables[index] = (key, _build_tables(sgd, params, grads, buffers, fresh, device), False)
            for p, buf, new in zip(params, buffers, fresh):
                if new:
                    self.state[p]["momentum_buffer"] = buf
        elif capturing and not cached[2]:
            cached = self._tables[index] = (cached[0], cached[1], True)
        lr = _kernel_lr(group["lr"], device)
        for table in cached[1]:
            sgd.fused_sgd(table, lr, momentum=momentum, dampening=group["dampening"],
                          weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"])


def _kernel_takes(p, grad, buf) -> bool:
    """Whether the kernel updates ``p``: a dtype of :data:`KERNEL_DTYPES`, dense, with its grad and momentum
    buffer of the same dtype and strides. Other parameters (float64, complex, strided) take the foreach path."""
    return p.dtype in KERNEL_DTYPES and _dense(p) and all(
        t is None or (t.dtype == p.dtype and t.stride() == p.stride()) for t in (grad, buf))


def _capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is being captured into a graph (never on other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers its memory span exactly once (contiguous up to a permutation of dimensions)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _build_tables(sgd, params, grads, buffers, fresh, device):
    """Validate a group for the kernel and build one address table per parameter dtype (first-seen order)."""
    by_dtype = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype, []).append(i)
    tables = []
    for dtype, idx in by_dtype.items():
        backend.use_triton(device, dtype)
        tables.append(sgd.make_sgd_table([params[i] for i in idx], [grads[i] for i in idx],
                                         [buffers[i] for i in idx], [fresh[i] for i in idx]))
    return tables


def _kernel_lr(lr, device):
    """``lr`` as the kernel takes it: a float, or a 1-element tensor on the parameters' device."""
    if not isinstance(lr, torch.Tensor) or lr.device == device:
        return lr
    if lr.device.type == "cpu":
        return float(lr)
    raise RuntimeError(f"lr tensor must be on the parameters' device ({device}) or the CPU, got {lr.device}")


def _foreach_sgd(params, grads, buffers, *, lr, momentum, dampening, weight_decay, nesterov, maximize):
    """torch.optim.SGD's foreach update, in the parameter dtype; new momentum buffers are put in ``buffers``."""
    owned = maximize or weight_decay != 0
    if maximize:
        grads = torch._foreach_neg(grads)
        if weight_decay != 0:
            torch._foreach_add_(grads, params, alpha=weight_decay)
    elif weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if all(buf is not None for buf in buffers):
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, grads, alpha=1 - dampening)
        else:
            for i, (buf, grad) in enumerate(zip(buffers, grads)):
                if buf is None:
                    buffers[i] = grad.detach().clone()
                else:
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
        if nesterov and owned:
            torch._foreach_add_(grads, buffers, alpha=momentum)
        elif nesterov:
            grads = torch._foreach_add(grads, buffers, alpha=momentum)
        else:
            grads = buffers
    if isinstance(lr, torch.Tensor):
        torch._foreach_addcmul_(params, grads, [lr] * len(params), value=-1)
    else:
        torch._foreach_add_(params, grads, alpha=-lr)
