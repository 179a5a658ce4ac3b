"""``FusedTrainStep``: forward, mean NLL loss, backward and momentum-SGD update of a FusedMLP in one call.

``loss = step(x, target)`` does what this eager loop does, and returns the same 0-dim loss without
synchronising the host::

    loss = F.nll_loss(model(x), target, ignore_index=ignore_index)   # mean over the counted rows
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

after which the parameters and the optimizer's ``state[p]["momentum_buffer"]`` equal the eager ones to
rounding, and every ``.grad`` is None (``keep_grad=True`` leaves the step's gradients there instead, as views
of one flat buffer ``dw1 | db1 | dw2 | db2``; a ``.grad`` present before the call is ignored, not added to).
Hyper-parameters (lr — a float or a tensor —, momentum, dampening, weight_decay, nesterov, maximize) are read
from each parameter's param group at every call, so schedulers work; parameter groups may differ.

Triton path (CUDA, or the interpreter): two launches per step, no host sync, nothing allocated after the
first call of a batch size but the returned loss (design, traffic and memory: :mod:`pyfused.kernels.train_step`).
Launch 1 makes the forward, the loss terms and the row gradients (dz, dh); launch 2 reduces the weight
gradients tile by tile in a fixed order (deterministic) and applies SGD in the same kernel. Hyper-parameters
live in a small device tensor, rewritten (one host→device copy) only when a value changes.
``step.capture(x_example, target_example)`` records both launches in a CUDA graph; later calls with the same
shapes copy the batch into the graph's inputs and replay it (one graph launch, plus one copy of the loss
so that earlier losses stay valid).

Accumulation and data parallelism: ``FusedTrainStep(model, optimizer, process_group, accumulation_steps=k)``
applies the update at every k-th call, with the mean over the last k batches of each batch's mean-loss
gradient (the course's loop: ``(loss / k).backward()`` per batch, ``step()`` every k); ``flush()`` applies a
trailing group of r < k batches with their mean (``loss / r``). With a process group (e.g. ``dist.group.WORLD``;
every rank calls the step, and flush, in the same order) each batch's mean is over every rank's counted rows:
the ranks all-reduce (Σ nll, count) per call — two numbers —, accumulate their share of the gradient locally,
and all-reduce the flat gradient ``dw1 | db1 | dw2 | db2`` once per update, between the gradient and update
kernels. So W ranks make the updates of one process on the concatenated batches, also with uneven shards or
ignored targets (where DDP's average of the ranks' means would differ), and the returned loss is the global
mean. Triton path: launch 1, then launch 2 writing the scaled gradient tiles into the flat buffer (fp32 for
16-bit parameters) instead of updating; the update is one more launch, ``step_update_kernel``, after the
all-reduce. No host sync beyond what the collectives need; ``capture()`` is not available in this mode.

Torch path (CPU; ``PYFUSED_BACKEND=torch``): eager's own ATen ops, without autograd
(:class:`pyfused.train_step_torch.TorchStepPath`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyfused import backend, checks
from pyfused.modules import FusedMLP
from pyfused.optim import FusedSGD
from pyfused.train_step_torch import TorchStepPath

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
NAMES = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class FusedTrainStep(TorchStepPath):
    """One fused SGD training step of ``model`` (a FusedMLP) by ``optimizer`` (a FusedSGD, or torch.optim.SGD,
    over the model's parameters; other parameters in it are left alone, as eager leaves those without grad).

    ``process_group``: a torch.distributed group whose ranks train together (None: this process alone).
    ``accumulation_steps``: batches per update (see the module docstring; :meth:`flush` for a trailing group).
    ``keep_grad``: leave the step's gradients in ``.grad`` (else None); while accumulating, ``.grad`` holds the
    running sum between calls (for 16-bit parameters on the Triton path, only after each update).
    ``ignore_index``: the target value whose rows the loss skips. The model's activation and parameters are
    bound at construction: make a new step after replacing them.
    The optimizer's step hooks do not run (its ``step`` is not called); LR schedulers see a stepped optimizer.
    Refused: a model that is not a FusedMLP, another optimizer class, model parameters missing from the
    optimizer or frozen, parameters of mixed dtype or device or not contiguous, ``differentiable=True``.
    """

    def __init__(self, model, optimizer, process_group=None, accumulation_steps: int = 1, *,
                 keep_grad: bool = False, ignore_index: int = -100) -> None:
        if not isinstance(model, FusedMLP):
            raise TypeError(f"model must be a pyfused.FusedMLP, got {type(model).__name__}")
        if not isinstance(optimizer, (FusedSGD, torch.optim.SGD)):
            raise TypeError(f"optimizer must be a pyfused.FusedSGD (or torch.optim.SGD), "
                            f"got {type(optimizer).__name__}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
            raise TypeError(f"accumulation_steps must be an int, got {type(accumulation_steps).__name__}")
        if accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be at least 1, got {accumulation_steps}")
        if process_group is not None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("process_group given but torch.distributed is not initialised "
                                   "(call dist.init_process_group first)")
            if not isinstance(process_group, dist.ProcessGroup):
                raise TypeError(f"process_group must be a torch.distributed.ProcessGroup (e.g. dist.group.WORLD) "
                                f"or None, got {type(process_group).__name__}")
        self.model, self.optimizer, self.activation = model, optimizer, model.activation
        self.process_group, self.accumulation_steps = process_group, accumulation_steps
        self.accumulating = process_group is not None or accumulation_steps > 1
        self._calls = 0  # batches accumulated since the last update
        self.keep_grad, self.ignore_index = bool(keep_grad), ignore_index
        self.params = [model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias]
        self.bias = self.params[1] is not None
        present = [p for p in self.params if p is not None]
        owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        ref = present[0]
        for name, p in zip(NAMES, self.params):
            if p is None:
                continue
            if id(p) not in owner:
                raise ValueError(f"model parameter {name} is not in the optimizer's param groups")
            if not p.requires_grad:
                raise ValueError(f"model parameter {name} does not require grad; FusedTrainStep trains all of them")
            if p.dtype != ref.dtype or p.device != ref.device:
                raise ValueError(f"model parameters must share one dtype and device, got {name} "
                                 f"{p.dtype} on {p.device} and fc1.weight {ref.dtype} on {ref.device}")
            if not p.is_contiguous():
                raise ValueError(f"model parameter {name} must be contiguous, got strides {p.stride()}")
            if owner[id(p)].get("differentiable", False):
                raise ValueError("FusedTrainStep does not support differentiable=True optimizers")
        self.groups = [None if p is None else owner[id(p)] for p in self.params]
        self.dtype, self.device = ref.dtype, ref.device
        # gradients as views (w1, b1, w2, b2) of one flat buffer, kept (keep_grad) or accumulated into
        self.flat_grad = self._views = None  # made on first use (:meth:`_grad_buffer`)
        self.grads = self._grad_buffer()[1] if self.keep_grad else None
        self._sums = None  # Triton path, accumulating: (flat, views) in the accumulator dtype
        self._totals = None  # Triton path, with a process group: (2,) Σ nll, count over the ranks
        self._hp = None  # Triton path: (4, HP_WIDTH) device hyper-parameters, and their host copy
        self._hp_host = None
        self._pending = [False] * 4  # momentum buffers created but not yet stepped (first-step rule)
        self._workspace = None  # Triton path: (rows, (h, dz, dh, stats)) of the last batch size
        self._torch_ws = None  # torch path: (h, z, y, dy, dz, dh, dhᵀ, dzᵀ) of the last batch size
        self._detached = None  # torch path: see _aliases
        self._graph = None
        self._one = torch.ones((), dtype=self.dtype, device=self.device)

    # ------------------------------------------------------------------ call
    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One training step on ``x`` (B, in) and ``target`` (B,); returns the mean loss (0-dim, no sync)."""
        self._check(x, target)
        if self.accumulating:
            loss = self._accumulate(x, target)
            self._calls += 1
            if self._calls == self.accumulation_steps:
                self._apply()
            else:
                self._set_grads()
            return loss
        graph = self._graph
        if graph is not None and x.shape == graph["x"].shape:
            loss = self._replay(graph, x, target)
        elif backend.use_triton(x.device, x.dtype):
            if x.device.type == "cpu":
                checks.check_target_range(target, self.params[2].shape[0], self.ignore_index)
            bufs = self._buffers()
            self._refresh_hp()
            loss = self._launch(x, target, bufs, self._kernel_ws(x.shape[0]))
        else:
            loss = self._torch_step(x, target)
        self._stepped()
        return loss

    def flush(self) -> bool:
        """Apply the update of a trailing partial group: after r < accumulation_steps calls, SGD with the mean
        gradient of those r batches (the eager loop that divides the last group's losses by r). Returns whether
        an update was applied (False when no batch is pending). With a process group, a collective: call it on
        every rank."""
        if self._calls == 0:
            return False
        self._apply()
        return True

    def _stepped(self) -> None:
        """Book-keeping after an update: first-step flags cleared, the optimizer marked stepped, ``.grad`` set."""
        self._pending = [False] * 4
        self.optimizer._opt_called = True  # what an LR scheduler's wrapper of optimizer.step records
        self._set_grads()

    def _set_grads(self) -> None:
        for p, g in zip(self.params, self.grads or (None, None, None, None)):
            if p is not None and (g is not None or p.grad is not None):
                p.grad = g

    def _grad_buffer(self):
        """(flat, views): the gradient buffer in the parameters' dtype, made on first use."""
        if self._views is None:
            self.flat_grad, self._views = self._flat(self.dtype)
        return self.flat_grad, self._views

    def _flat(self, dtype):
        """(flat, views): one buffer ``dw1 | db1 | dw2 | db2`` of ``dtype`` and its views shaped like the
        parameters (None for absent biases)."""
        flat = torch.empty(sum(p.numel() for p in self.params if p is not None), dtype=dtype, device=self.device)
        views, offset = [], 0
        for p in self.params:
            views.append(None if p is None else flat[offset:offset + p.numel()].view_as(p))
            offset += 0 if p is None else p.numel()
        return flat, views

    def _check(self, x, target) -> None:
        """Validate a batch: the common valid case in a few comparisons, errors by the detailed checks."""
        if (isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor) and x.dim() == 2
                and x.shape[1] == self.params[0].shape[1] and x.dtype == self.dtype and x.device == self.device
                and target.dtype in _INDEX_DTYPES and target.shape == x.shape[:1] and target.device == x.device):
            return
        for name, t in (("x", x), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        n_in = self.params[0].shape[1]
        if x.dim() != 2 or x.shape[1] != n_in:
            raise checks.ShapeError(f"x must have shape (B, {n_in}), got {tuple(x.shape)} (reshape it first)")
        if x.dtype != self.dtype:
            raise checks.DTypeError(f"x must have the parameters' dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise checks.DeviceError(f"x must be on the parameters' device {self.device}, got {x.device}")
        checks.check_target(x, target, self.params[2].shape[0], "mean", self.ignore_index)

    def _buffers(self):
        """The optimizer's momentum buffers of (w1, b1, w2, b2), None where momentum is 0; missing ones are
        created (zeros) and marked pending: torch's first-step rule ``buf = g`` applies to them."""
        bufs = [None] * 4
        for i, (p, group) in enumerate(zip(self.params, self.groups)):
            if p is None or group["momentum"] == 0:
                continue
            state = self.optimizer.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.zeros_like(p)
                self._pending[i] = True
            elif buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device or not buf.is_contiguous():
                raise RuntimeError(f"momentum_buffer of {NAMES[i]} must be a contiguous tensor like the parameter "
                                   f"({tuple(p.shape)}, {p.dtype}, {p.device}), got {tuple(buf.shape)}, {buf.dtype}, "
                                   f"{buf.device}")
            bufs[i] = buf
        return bufs

    # ------------------------------------------------------------------ accumulation, process groups
    def _accumulate(self, x, target) -> torch.Tensor:
        """Add this batch's gradient of its mean loss, divided by accumulation_steps, to the gradient sums
        (overwrite them on a group's first batch); returns the mean loss. With a process group the mean is over
        every rank's counted rows: (Σ nll, count) is all-reduced before the gradients are scaled."""
        first = self._calls == 0
        if not backend.use_triton(x.device, x.dtype):
            return self._torch_accumulate(x, target, first)
        from pyfused.kernels.train_step import step_accumulate, step_rows

        if x.device.type == "cpu":
            checks.check_target_range(target, self.params[2].shape[0], self.ignore_index)
        h, dz, dh, stats = self._kernel_ws(x.shape[0])
        loss = torch.empty((), dtype=self.dtype, device=self.device)
        totals = None
        with torch.no_grad():
            if x.shape[0] > 0:
                step_rows(x, *self.params, target, self.ignore_index, h, dz, dh, stats, self.activation)
            if self.process_group is not None:
                if self._totals is None:
                    self._totals = stats.new_empty(2)
                totals = torch.sum(stats, 0, out=self._totals)
                dist.all_reduce(totals, group=self.process_group)
            step_accumulate(x, h, dz, dh, stats, self.params, self._kernel_sums()[1], totals,
                            self.accumulation_steps, not first, loss)
        return loss

    def _kernel_sums(self):
        """The Triton path's gradient sums (flat, views): the gradient views themselves when the parameters are
        fp32 or fp64, else an fp32 buffer (written to the views, if kept, at each update)."""
        if self.dtype in (torch.float32, torch.float64):
            return self._grad_buffer()
        if self._sums is None:
            self._sums = self._flat(torch.float32)
        return self._sums

    def _apply(self) -> None:
        """The update of the r batches accumulated: all-reduce (sum) of the gradient sums over the process
        group, then SGD from ``sums · accumulation_steps / r``."""
        k, r = self.accumulation_steps, self._calls
        kernels = backend.use_triton(self.device, self.dtype)
        flat, sums = self._kernel_sums() if kernels else self._grad_buffer()
        if self.process_group is not None:
            dist.all_reduce(flat, group=self.process_group)
        if kernels:
            from pyfused.kernels.train_step import step_update

            bufs = self._buffers()
            self._refresh_hp()
            with torch.no_grad():
                step_update(self.params, bufs, sums, self.grads, self._hp, k, r)
        else:
            if r != k:
                flat.mul_(k / r)
            self._foreach_update(sums)
        self._calls = 0
        self._stepped()

    # ------------------------------------------------------------------ Triton path
    def _refresh_hp(self) -> None:
        """Write the hyper-parameter rows (layout: :func:`pyfused.kernels.train_step.sgd_update`) to the device
        tensor when they changed (one host→device copy); a CUDA tensor lr is copied in at every call (one copy)."""
        from pyfused.kernels.train_step import HP_WIDTH

        rows, tensor_lrs = [], {}
        for i, group in enumerate(self.groups):
            if group is None:
                rows.append((0.0,) * HP_WIDTH.value)
                continue
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                if lr.device.type == "cpu":
                    lr = float(lr)
                else:
                    tensor_lrs.setdefault(id(lr), (lr, []))[1].append(i)
                    lr = 0.0
            rows.append((float(lr), float(group["momentum"]), float(group["dampening"]),
                         float(group["weight_decay"]), float(bool(group["nesterov"])),
                         -1.0 if group["maximize"] else 1.0, float(self._pending[i]), 0.0))
        if self._hp is None:
            dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
            self._hp = torch.empty((4, HP_WIDTH.value), dtype=dtype, device=self.device)
        if rows != self._hp_host:
            host = torch.tensor(rows, dtype=self._hp.dtype)
            self._hp.copy_(host.pin_memory() if self.device.type == "cuda" else host, non_blocking=True)
            self._hp_host = rows
        for lr, index in tensor_lrs.values():  # one copy per lr tensor when its rows are evenly spaced
            step = index[1] - index[0] if len(index) > 1 else 1
            if index == list(range(index[0], index[-1] + 1, step)):
                self._hp[index[0]:index[-1] + 1:step, 0].copy_(lr.reshape(()).expand(len(index)))
            else:
                for i in index:
                    self._hp[i, 0].copy_(lr.reshape(()))

    def _kernel_ws(self, rows, keep=True):
        """(h, dz, dh, stats) for ``rows`` rows; kept for the next call of the same batch size when ``keep``."""
        from pyfused.kernels.train_step import stats_rows

        if keep and self._workspace is not None and self._workspace[0] == rows:
            return self._workspace[1]
        n_in, n_hidden, n_out = self.params[0].shape[1], self.params[0].shape[0], self.params[2].shape[0]
        new = lambda *s: torch.empty(s, dtype=self.dtype, device=self.device)  # noqa: E731
        stats = torch.empty((stats_rows(rows, n_in, n_hidden, n_out, self.dtype), 2), device=self.device,
                            dtype=torch.float64 if self.dtype == torch.float64 else torch.float32)
        ws = (new(rows, n_hidden), new(rows, n_out), new(rows, n_hidden), stats)
        if keep:
            self._workspace = (rows, ws)
        return ws

    def _launch(self, x, target, bufs, ws):
        """The two launches of one step (hyper-parameters already refreshed); returns the loss they write."""
        from pyfused.kernels.train_step import step_grads, step_rows

        h, dz, dh, stats = ws
        w1, b1, w2, b2 = self.params
        loss = torch.empty((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            if x.shape[0] > 0:
                step_rows(x, w1, b1, w2, b2, target, self.ignore_index, h, dz, dh, stats, self.activation)
            step_grads(x, h, dz, dh, stats, self.params, bufs, self.grads, self._hp, loss)
        return loss

    def capture(self, x_example: torch.Tensor, target_example: torch.Tensor) -> None:
        """Record the step for batches shaped like ``x_example`` in a CUDA graph (CUDA, Triton path only).

        Later calls whose x has this shape copy x and target into the graph's static inputs and replay it;
        other shapes run the launches as usual. Compiling the kernels needs one real step before the capture,
        on a side stream: it is undone (parameters and momentum buffers restored), so capturing trains nothing.
        Hyper-parameters stay live (device tensor); switching momentum on or off for a parameter, or replacing
        the optimizer's momentum buffers (load_state_dict), needs a new capture. The returned loss is a copy of
        the graph's output, so earlier losses are not overwritten by later replays.
        """
        self._check(x_example, target_example)
        if self.accumulating:
            raise RuntimeError("capture() records the single-process step without accumulation; this step has "
                               "a process group or accumulation_steps > 1")
        if x_example.device.type != "cuda" or not backend.use_triton(x_example.device, x_example.dtype):
            raise RuntimeError("capture() needs CUDA tensors on the Triton path")
        if x_example.shape[0] == 0:
            raise ValueError("capture() needs a non-empty example batch")
        with torch.cuda.device(self.device):  # streams, graph and launches on the parameters' GPU
            self._graph = self._capture(x_example, target_example)

    def _capture(self, x_example, target_example):
        self._graph = None
        static_x, static_t = x_example.clone(), target_example.clone()
        bufs = self._buffers()
        self._refresh_hp()
        ws = self._kernel_ws(static_x.shape[0], keep=False)
        live = [t for t in (*self.params, *bufs) if t is not None]
        saved = [t.detach().clone() for t in live]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._launch(static_x, static_t, bufs, ws)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            torch._foreach_copy_(live, saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self._launch(static_x, static_t, bufs, ws)
        return dict(graph=graph, x=static_x, target=static_t, loss=loss, bufs=bufs, ws=ws)

    def _replay(self, graph, x, target):
        from pyfused.kernels.launch import on_device

        bufs = self._buffers()
        if any(a is not b for a, b in zip(bufs, graph["bufs"])):
            raise RuntimeError("the optimizer's momentum buffers changed since capture() (momentum switched on or "
                               "off, or state loaded); call capture() again")
        self._refresh_hp()
        with on_device(self.device):
            graph["x"].copy_(x)
            graph["target"].copy_(target)
            graph["graph"].replay()
            return graph["loss"].clone()
