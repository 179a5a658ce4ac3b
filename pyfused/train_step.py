"""``FusedTrainStep``: forward, loss, backward and optimizer update of a fused MLP of any depth in one call.

``loss = step(x, target)`` does what this eager loop does, and returns the same 0-dim loss without
synchronising the host::

    loss = F.<loss>(model(x), target, reduction=reduction)   # nll_loss, cross_entropy or mse_loss
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)

after which the parameters and the optimizer's state (SGD's ``momentum_buffer``; Adam's ``step``, ``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``) equal the eager ones to rounding, and every ``.grad`` is None (``keep_grad=True``
leaves the step's gradients there instead, as views of one flat buffer ``dw_1 | db_1 | … | dw_L | db_L``; a
``.grad`` present before the call is ignored, not added to). Hyper-parameters (lr — a float or a tensor — and the
optimizer's options) are read from each parameter's param group at every call, so schedulers work; parameter
groups may differ.

Paths (chosen per call, :mod:`pyfused.backend`): the Triton kernels — two launches per step whatever the depth,
loss or optimizer, no host sync, CUDA-graph capture (:mod:`pyfused.step_kernels`) — or the torch path, eager's
own ATen ops without autograd (:mod:`pyfused.step_torch`).

Accumulation and data parallelism: ``FusedTrainStep(model, optimizer, process_group, accumulation_steps=k)``
applies the update at every k-th call, with the gradient of the last k batches' losses each divided by k (the
course's loop: ``(loss / k).backward()`` per batch, ``step()`` every k); ``flush()`` applies a trailing group of
r < k batches divided by r. With a process group (e.g. ``dist.group.WORLD``; every rank calls the step, and flush,
in the same order) each batch's mean is over every rank's counted rows (or elements): the ranks all-reduce
(Σ loss, count) per call — two numbers —, accumulate their share of the gradient locally, and all-reduce the flat
gradient once per update, between the gradient and update kernels. So W ranks make the updates of one process on
the concatenated batches, also with uneven shards or ignored targets (where DDP's average of the ranks' means
would differ), and the returned loss is the global one. ``capture()`` is not available in this mode.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pyfused import backend, checks
from pyfused.modules import DeepFusedMLP, FusedMLP
from pyfused.step_optimizer import OptimizerBinding

_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class FusedTrainStep:
    """One fused training step of ``model`` (a FusedMLP or DeepFusedMLP) by ``optimizer`` (a FusedSGD, FusedAdam or
    FusedAdamW, or their torch.optim counterparts, over the model's parameters; other parameters in it are left
    alone, as eager leaves those without grad).

    ``process_group``: a torch.distributed group whose ranks train together (None: this process alone).
    ``accumulation_steps``: batches per update (see the module docstring; :meth:`flush` for a trailing group).
    ``loss``: "nll" (a log_softmax model), "cross_entropy" or "mse" (a logits model, ``log_softmax=False``;
    MSE targets are floats of the logits' shape); ``reduction``: "mean" or "sum".
    ``keep_grad``: leave the step's gradients in ``.grad`` (else None); while accumulating, ``.grad`` holds the
    running sum between calls (for 16-bit parameters on the Triton path, only after each update).
    ``ignore_index``: the target value whose rows a class loss skips. The model's layers, activations and
    parameters are bound at construction: make a new step after replacing them.
    The optimizer's step hooks do not run (its ``step`` is not called); LR schedulers see a stepped optimizer.
    Refused: another model or optimizer class, a loss that does not fit the model's head, model parameters
    missing from the optimizer or frozen, parameters of mixed dtype or device or not contiguous,
    ``differentiable=True``.
    """

    def __init__(self, model, optimizer, process_group=None, accumulation_steps: int = 1, *, loss: str = "nll",
                 reduction: str = "mean", keep_grad: bool = False, ignore_index: int = -100) -> None:
        if not isinstance(model, (FusedMLP, DeepFusedMLP)):
            raise TypeError(f"model must be a pyfused.FusedMLP or DeepFusedMLP, got {type(model).__name__}")
        checks.check_choice("loss", loss, checks.LOSSES)
        checks.check_choice("reduction", reduction, ("mean", "sum"))
        if (loss == "nll") != model.log_softmax:
            raise ValueError(f"loss={loss!r} does not fit the model's head: nll takes a log_softmax model, "
                             f"cross_entropy and mse a logits model (log_softmax=False); this model has "
                             f"log_softmax={model.log_softmax}")
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
        layers = model.linears()
        self.model, self.optimizer = model, optimizer
        self.weights = [fc.weight for fc in layers]
        self.biases = [fc.bias for fc in layers]
        self.params = [t for pair in zip(self.weights, self.biases) for t in pair]
        self.names = [f"fc{i}.{kind}" for i in range(1, len(layers) + 1) for kind in ("weight", "bias")]
        self.activations, self.head = tuple(model.activations), "log_softmax" if model.log_softmax else "logits"
        self.loss, self.kind = loss, "mse" if loss == "mse" else "class"
        self.reduction, self.ignore_index, self.keep_grad = reduction, ignore_index, bool(keep_grad)
        self.widths = (self.weights[0].shape[1], *(w.shape[0] for w in self.weights))
        self.binding = OptimizerBinding(optimizer, self.params, self.names)
        ref = self.weights[0]
        for name, p in zip(self.names, self.params):
            if p is None:
                continue
            if not p.requires_grad:
                raise ValueError(f"model parameter {name} does not require grad; FusedTrainStep trains all of them")
            if p.dtype != ref.dtype or p.device != ref.device:
                raise ValueError(f"model parameters must share one dtype and device, got {name} "
                                 f"{p.dtype} on {p.device} and fc1.weight {ref.dtype} on {ref.device}")
            if not p.is_contiguous():
                raise ValueError(f"model parameter {name} must be contiguous, got strides {p.stride()}")
        self.dtype, self.device = ref.dtype, ref.device
        self.process_group, self.accumulation_steps = process_group, accumulation_steps
        self.accumulating = process_group is not None or accumulation_steps > 1
        self._calls = 0  # batches accumulated since the last update
        self.flat_grad = self._views = None  # the gradient buffer, made on first use (grad_views)
        self.grads = self.grad_views() if self.keep_grad else None
        self._sums = None  # Triton path, accumulating 16-bit parameters: (flat, views) in float32
        self._paths = {}

    # ------------------------------------------------------------------ call
    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One training step on ``x`` (B, in) and ``target`` (B,) or, for MSE, (B, out); returns the loss (0-dim,
        no sync)."""
        self._check(x, target)
        kernels = backend.use_triton(x.device, x.dtype, self.widths[-1])
        if kernels and x.device.type == "cpu" and self.kind == "class":
            checks.check_target_range(target, self.widths[-1], self.ignore_index)
        path = self._path(kernels)
        if self.accumulating:
            loss = path.accumulate(x, target, self._calls == 0, self._sums_views(kernels))
            self._calls += 1
            if self._calls == self.accumulation_steps:
                self._apply()
            else:
                self._set_grads()
            return loss
        graph = getattr(path, "graph", None)
        if graph is not None and x.shape == graph["x"].shape:
            loss = path.replay(x, target)
        else:
            loss = path.step_once(x, target)
        self._stepped()
        return loss

    def flush(self) -> bool:
        """Apply the update of a trailing partial group: after r < accumulation_steps calls, the optimizer with the
        gradient of those r batches divided by r (the eager loop that divides the last group's losses by r).
        Returns whether an update was applied (False when no batch is pending). With a process group, a
        collective: call it on every rank."""
        if self._calls == 0:
            return False
        self._apply()
        return True

    def capture(self, x_example: torch.Tensor, target_example: torch.Tensor) -> None:
        """Record the step for batches shaped like ``x_example`` in a CUDA graph (CUDA, Triton path only).

        Later calls whose x has this shape copy x and target into the graph's static inputs and replay it;
        other shapes run the launches as usual. Compiling the kernels needs one real step before the capture,
        on a side stream: it is undone (parameters and optimizer state restored), so capturing trains nothing.
        Hyper-parameters stay live (device tensor); switching momentum on or off for a parameter, or replacing
        the optimizer's state (load_state_dict), needs a new capture. The returned loss is a copy of the graph's
        output, so earlier losses are not overwritten by later replays.
        """
        self._check(x_example, target_example)
        if self.accumulating:
            raise RuntimeError("capture() records the single-process step without accumulation; this step has "
                               "a process group or accumulation_steps > 1")
        if x_example.device.type != "cuda" or not backend.use_triton(x_example.device, x_example.dtype,
                                                                     self.widths[-1]):
            raise RuntimeError("capture() needs CUDA tensors on the Triton path (out_features within the kernels' "
                               "limit: pyfused.kernels.rows.max_out)")
        if x_example.shape[0] == 0:
            raise ValueError("capture() needs a non-empty example batch")
        with torch.cuda.device(self.device):  # streams, graph and launches on the parameters' GPU
            self._path(True).capture(x_example, target_example)

    @property
    def static_inputs(self):
        """``(x, target)``: the captured graph's input buffers (None before :meth:`capture`). A batch written into
        them (``x.copy_(batch, non_blocking=True)``, a loader filling them) and passed as ``step(x, target)``
        replays without the two copies a new batch takes."""
        path = self._paths.get(True)
        graph = getattr(path, "graph", None)
        return None if graph is None else (graph["x"], graph["target"])

    # ------------------------------------------------------------------ what the paths use
    def grad_views(self):
        """The views (w_1, b_1, …; None for absent biases) of the flat gradient buffer (the parameters' dtype),
        made on first use."""
        if self._views is None:
            self.flat_grad, self._views = self._flat(self.dtype)
        return self._views

    def check_params(self) -> None:
        if any(p is not None and (p.dtype != self.dtype or p.device != self.device or not p.is_contiguous())
               for p in self.params):
            raise RuntimeError("the model's parameters changed dtype, device or layout (they must stay contiguous) "
                               "since FusedTrainStep was made; make a new one")

    # ------------------------------------------------------------------ internals
    def _path(self, kernels: bool):
        path = self._paths.get(kernels)
        if path is None:
            if kernels:
                from pyfused.step_kernels import KernelStepPath as cls
            else:
                from pyfused.step_torch import TorchStepPath as cls
            path = self._paths[kernels] = cls(self)
        return path

    def _flat(self, dtype):
        """(flat, views): one buffer ``dw_1 | db_1 | …`` of ``dtype`` and its views shaped like the parameters."""
        flat = torch.empty(sum(p.numel() for p in self.params if p is not None), dtype=dtype, device=self.device)
        views, offset = [], 0
        for p in self.params:
            views.append(None if p is None else flat[offset:offset + p.numel()].view_as(p))
            offset += 0 if p is None else p.numel()
        return flat, views

    def _sums_views(self, kernels: bool):
        """The gradient sums of accumulation: the gradient views themselves, except on the Triton path for 16-bit
        parameters (a float32 buffer, written to the views, if kept, at each update)."""
        if not kernels or self.dtype in (torch.float32, torch.float64):
            return self.grad_views()
        if self._sums is None:
            self._sums = self._flat(torch.float32)
        return self._sums[1]

    def _apply(self) -> None:
        """The update of the r batches accumulated: all-reduce (sum) of the gradient sums over the process group,
        then the optimizer from ``sums · accumulation_steps / r``."""
        k, r = self.accumulation_steps, self._calls
        kernels = backend.use_triton(self.device, self.dtype, self.widths[-1])
        views = self._sums_views(kernels)
        flat = self.flat_grad if views is self._views else self._sums[0]
        if self.process_group is not None:
            dist.all_reduce(flat, group=self.process_group)
        path = self._path(kernels)
        if kernels:
            path.apply(views, k, r)
        else:
            if r != k:
                flat.mul_(k / r)
            path.update(views)
        self._calls = 0
        self._stepped()

    def _stepped(self) -> None:
        """Book-keeping after an update: the optimizer marked stepped, ``.grad`` set."""
        self.optimizer._opt_called = True  # what an LR scheduler's wrapper of optimizer.step records
        self._set_grads()

    def _set_grads(self) -> None:
        for p, g in zip(self.params, self.grads or [None] * len(self.params)):
            if p is not None and (g is not None or p.grad is not None):
                p.grad = g

    def _check(self, x, target) -> None:
        """Validate a batch: the common valid case in a few comparisons, errors by the detailed checks."""
        n_in, n_out = self.widths[0], self.widths[-1]
        if (isinstance(x, torch.Tensor) and isinstance(target, torch.Tensor) and x.dim() == 2
                and x.shape[1] == n_in and x.dtype == self.dtype and x.device == self.device
                and target.device == x.device
                and ((self.kind == "class" and target.dtype in _INDEX_DTYPES and target.shape == x.shape[:1])
                     or (self.kind == "mse" and target.dtype == x.dtype and target.shape == (x.shape[0], n_out)))):
            return
        for name, t in (("x", x), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if x.dim() != 2 or x.shape[1] != n_in:
            raise checks.ShapeError(f"x must have shape (B, {n_in}), got {tuple(x.shape)} (reshape it first)")
        if x.dtype != self.dtype:
            raise checks.DTypeError(f"x must have the parameters' dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise checks.DeviceError(f"x must be on the parameters' device {self.device}, got {x.device}")
        if self.kind == "mse":
            checks.check_mse_target(x, target, n_out, self.reduction)
        else:
            checks.check_target(x, target, n_out, self.reduction, self.ignore_index)
