"""The Triton path of :class:`pyfused.train_step.FusedTrainStep` (CUDA, or the interpreter): two launches per
step for any depth, no host synchronisation, CUDA-graph capture.

1. :func:`pyfused.kernels.rows.rows` — forward of every layer, the loss and its unscaled logit gradient, every
   hidden layer's pre-activation gradient, and per-row-block loss sums and counts;
2. :func:`pyfused.kernels.grads.grads` — every weight-gradient tile, scaled by ``1 / (k · divisor)``, with the
   optimizer's update (SGD or Adam/AdamW) applied to it in the epilogue, and one program writing the loss.

With a process group or accumulation steps, launch 2 writes (or adds) the scaled gradient into the flat
gradient sums instead, the caller all-reduces them per update, and the update is one launch of the multi-tensor
optimizer kernel (:func:`pyfused.kernels.optimizers.optimizer_step`) per group of parameters sharing its state
flags (one for a model in one param group). Hyper-parameters live in a float64 device tensor (one row per
parameter), rewritten (one host→device copy) only when a value changes; a CUDA tensor lr is copied in at each
call. SGD's first-step flags and the update's counters are an int32 device "book"; Adam's step counts are the
optimizer's float32 ``state["step"]`` tensors on the device, advanced by the kernels.

Extra memory per batch size B: ``2·B·Σ n_i·s`` (hidden activations and their gradients) + ``B·out·s`` (dz) +
``8·R`` (stats) — with the large-batch row tiles, instead of dz, ``R·out·(n_{L−1} + 1)`` accumulator elements of
the last layer's per-row-block gradients (:func:`pyfused.kernels.rows.row_partials_pay`), which launch 2 sums; plus ``P·s`` for kept gradients, ``P·4`` of float32 sums for 16-bit parameters when
accumulating, and the 16·2L-byte book and 64·2L-byte hyper-parameter rows.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class KernelStepPath:
    """One FusedTrainStep's kernel-path state: workspaces, hyper-parameters, book, update tables, CUDA graph."""

    def __init__(self, step) -> None:
        self.step = step
        n_params = len(step.params)
        self._ws = None  # (rows, workspace) of the last batch size
        self._hp = self._hp_host = None
        self._book = torch.zeros((2, n_params), dtype=torch.int32, device=step.device)
        self._tables = None  # (key, tables) of the update-only pass
        self._new = set()  # parameters whose SGD buffer was made since the last table was built
        self._totals = None
        self.graph = None

    # ------------------------------------------------------------------ per call
    def _states(self):
        """The optimizer's state tensors of every parameter as ``(s1, s2, s3, steps)`` lists of 2L, made where
        missing; a new SGD buffer (zeros, whose first update is ``buf = d``) gets its first-step flag set in the
        book (a device write, no sync) and is remembered for the update-only pass's next table."""
        s = self.step
        lists = ([], [], [], [])
        for i, p in enumerate(s.params):
            made = (None,) * 5 if p is None else s.binding.states(i, s.device)
            for lst, t in zip(lists, made[:4]):
                lst.append(t)
            if made[4]:
                self._book[0, i] = 1
                self._new.add(i)
        return lists

    def refresh_hp(self) -> None:
        """Write the hyper-parameter rows to the device tensor when they changed; copy CUDA tensor lrs in."""
        from pyfused.kernels.optimizers import HP_WIDTH

        binding, rows, tensor_lrs = self.step.binding, [], []
        for i, group in enumerate(binding.groups):
            if group is None:
                rows.append((0.0,) * HP_WIDTH.value)
                continue
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
                tensor_lrs.append((i, lr))
                lr = 0.0
            row = binding.row(i, float(lr))
            rows.append(row + (0.0,) * (HP_WIDTH.value - len(row)))
        if self._hp is None:
            self._hp = torch.empty((len(rows), HP_WIDTH.value), dtype=torch.float64, device=self.step.device)
        if rows != self._hp_host:
            host = torch.tensor(rows, dtype=torch.float64)
            self._hp.copy_(host.pin_memory() if self.step.device.type == "cuda" else host, non_blocking=True)
            self._hp_host = rows
        for i, lr in tensor_lrs:
            self._hp[i, 0].copy_(lr.reshape(()))

    def workspace(self, rows, keep=True) -> dict:
        """Buffers for ``rows`` rows: hidden activations and their gradients, dz, stats; kept for the next call of
        the same batch size when ``keep``."""
        from pyfused.kernels.launch import dot_precision
        from pyfused.kernels.rows import n_row_blocks, row_partials_buffer

        s = self.step
        precision = dot_precision(s.dtype, s.device)
        key = (rows, precision)  # TF32 or not picks the row tiles, so the stats' rows
        if keep and self._ws is not None and self._ws[0] == key:
            return self._ws[1]
        new = lambda n: torch.empty((rows, n), dtype=s.dtype, device=s.device)  # noqa: E731
        hidden = s.widths[1:-1]
        stats = torch.empty((n_row_blocks(rows, s.widths, s.dtype, device=s.device) if rows else 0, 2),
                            device=s.device, dtype=torch.promote_types(s.dtype, torch.float32))
        # the last layer's dW from launch 1 with the large-batch tiles: then no dz
        partials = row_partials_buffer(rows, s.widths, s.dtype, precision, s.device)
        ws = dict(acts=[new(n) for n in hidden], dpres=[new(n) for n in hidden], stats=stats, partials=partials,
                  dz=new(s.widths[-1]) if partials is None else None)
        if keep:
            self._ws = (key, ws)
        return ws

    def _rows(self, x, target, ws) -> None:
        from pyfused.kernels.rows import rows

        s = self.step
        if x.shape[0] > 0:
            rows(x, s.weights, s.biases, s.activations, head=s.head, loss=s.kind, target=target,
                 ignore_index=s.ignore_index, acts=ws["acts"], dpres=ws["dpres"], dz=ws["dz"], stats=ws["stats"],
                 row_partials=ws["partials"])

    def _grads(self, x, ws, **epilogue) -> torch.Tensor:
        from pyfused.kernels.grads import grads

        s = self.step
        loss = torch.empty((), dtype=s.dtype, device=s.device)
        grads(x, s.weights, ws["acts"], [*ws["dpres"], ws["dz"]], need=(True,) * len(s.weights),
              has_bias=tuple(b is not None for b in s.biases), stats=ws["stats"], loss=loss,
              mean=s.reduction == "mean", row_partials=ws["partials"], **epilogue)
        return loss

    def launch(self, x, target, ws, states) -> torch.Tensor:
        """The two launches of one step (hyper-parameters already refreshed); returns the loss they write."""
        s, binding = self.step, self.step.binding
        n = len(s.params)
        self._rows(x, target, ws)
        return self._grads(x, ws, epilogue="update", grads=s.grads, params=s.params, states=states[:3],
                           steps=states[3], book=self._book, hp=self._hp, optimizer=binding.kind,
                           has_state=tuple(binding.has_state(i) for i in range(n)),
                           amsgrad=tuple(binding.amsgrad(i) for i in range(n)), keep_grad=s.grads is not None)

    def step_once(self, x, target):
        states = self._states()
        self.refresh_hp()
        with torch.no_grad():
            return self.launch(x, target, self.workspace(x.shape[0]), states)

    def accumulate(self, x, target, first, sums):
        """Launch 1, then launch 2 writing (``first``) or adding this batch's scaled gradient into ``sums`` (2L
        views); with a process group the loss sums and counts are all-reduced between the launches."""
        s = self.step
        ws = self.workspace(x.shape[0])
        with torch.no_grad():
            self._rows(x, target, ws)
            totals = None
            if s.process_group is not None:
                if self._totals is None:
                    self._totals = torch.empty(2, dtype=ws["stats"].dtype, device=s.device)
                totals = torch.sum(ws["stats"], 0, out=self._totals)
                dist.all_reduce(totals, group=s.process_group)
            return self._grads(x, ws, epilogue="accumulate", grads=sums, totals=totals, k=s.accumulation_steps,
                               add=not first)

    def apply(self, sums, num, den) -> None:
        """The update-only pass: the optimizer from ``sums · num / den``, one launch per group of parameters that
        share state flags (the tables are cached until an address changes)."""
        from pyfused.kernels.optimizers import make_table, optimizer_step

        s, binding = self.step, self.step.binding
        states = self._states()
        self.refresh_hp()
        present = [i for i, p in enumerate(s.params) if p is not None]
        key = tuple((s.params[i].data_ptr(), *(0 if t[i] is None else t[i].data_ptr() for t in states))
                    for i in present)
        if self._tables is None or self._tables[0] != key:
            new, self._new = {i: i in self._new for i in present}, set()
            groups = {}
            for i in present:
                groups.setdefault((binding.has_state(i), binding.amsgrad(i)), []).append(i)
            tables = []
            for (has_state, amsgrad), idx in groups.items():
                table = make_table([s.params[i] for i in idx], [sums[i] for i in idx],
                                   [[t[i] for t in states[:3] if t[i] is not None] for i in idx],
                                   [states[3][i] for i in idx], [None if s.grads is None else s.grads[i] for i in idx],
                                   idx, [new[i] for i in idx], binding.kind)
                tables.append((table, has_state, amsgrad))
            self._tables = (key, tables)
        with torch.no_grad():
            for table, has_state, amsgrad in self._tables[1]:
                optimizer_step(table, self._hp, optimizer=binding.kind, has_state=has_state, amsgrad=amsgrad,
                               keep_grad=s.grads is not None, grad_scale=num / den)

    # ------------------------------------------------------------------ CUDA graphs
    def capture(self, x_example, target_example) -> None:
        """Record both launches for batches shaped like ``x_example`` (see FusedTrainStep.capture)."""
        self.graph = None
        s = self.step
        static_x, static_t = x_example.clone(), target_example.clone()
        states = self._states()
        self.refresh_hp()
        ws = self.workspace(static_x.shape[0], keep=False)
        live = [t for t in (*s.params, *(t for lst in states for t in lst), self._book) if t is not None]
        saved = [t.detach().clone() for t in live]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            self.launch(static_x, static_t, ws, states)  # compiles the kernels; undone below
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            torch._foreach_copy_(live, saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            loss = self.launch(static_x, static_t, ws, states)
        self.graph = dict(graph=graph, x=static_x, target=static_t, loss=loss, states=states, ws=ws)

    def replay(self, x, target):
        from pyfused.kernels.launch import on_device

        graph = self.graph
        states = self._states()
        if any(a is not b for a, b in zip((t for lst in states for t in lst), (t for lst in graph["states"]
                                                                             for t in lst))):
            raise RuntimeError("the optimizer's state changed since capture() (momentum switched on or off, or "
                               "state loaded); call capture() again")
        self.refresh_hp()
        with on_device(self.step.device):
            if x is not graph["x"]:  # a batch in the static inputs (FusedTrainStep.static_inputs) is not copied
                graph["x"].copy_(x)
            if target is not graph["target"]:
                graph["target"].copy_(target)
            graph["graph"].replay()
            return graph["loss"].clone()
