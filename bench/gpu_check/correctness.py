"""Stage 2 of ``python -m bench.gpu_check``: the kernel variants against float64 PyTorch, with the tests' tolerances."""
from __future__ import annotations

import dataclasses
import traceback

import torch
import torch.nn.functional as F

import pyfused
from pyfused import torch_ops
from bench.gpu_check.common import DTYPES, SEED, copy_model, kernel_backend, with_precision
from bench.gpu_check.report import Report, table

def _absolute(atol, rtol):
    def rule(ours, exact, same):
        bound = atol + rtol * exact.abs()
        return (ours - exact).abs(), bound
    return rule


def _flash(ours, exact, same):
    """|ours − ref64| ≤ 2·|torch_same_dtype − ref64| + 2e-3, elementwise (the tests' rule for 16-bit types)."""
    return (ours - exact).abs(), 2 * (same - exact).abs() + 2e-3


# mode -> rule(ours, exact, same) -> (error, bound), all float64 tensors; the test suite's tolerances
RULES = {"fp32": _absolute(1e-4, 1e-4), "tf32": _absolute(2e-2, 2e-2), "bf16": _flash, "fp16": _flash,
         "fp64": _absolute(1e-10, 1e-10)}
def _flash_norm(ours, exact, same):
    """‖ours − ref64‖ ≤ 2·‖torch_same_dtype − ref64‖ + 1e-3 per tensor (the tests' rule for 16-bit Adam, whose
    normalised steps make elementwise errors of the order of lr wherever the roundings part)."""
    return (ours - exact).norm().reshape(1), (2 * (same - exact).norm() + 1e-3).reshape(1)


# FusedSGD / FusedTrainStep after several steps, against the same computation by torch in float64 / same dtype
STEP_RULES = {"fp32": _absolute(1e-5, 1e-4), "tf32": _absolute(2e-2, 2e-2), "bf16": _flash, "fp16": _flash,
              "fp64": _absolute(1e-10, 1e-10)}
ADAM_RULES = dict(STEP_RULES, bf16=_flash_norm, fp16=_flash_norm)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel configuration to check: mode (a key of :data:`DTYPES`), sizes, bias, hidden activation."""

    mode: str
    shape: tuple
    bias: bool
    activation: str

    def label(self) -> str:
        rows, n_in, hidden, out = self.shape
        return f"{self.mode} {rows}×{n_in}→{hidden}→{out} {'bias' if self.bias else 'no bias'} {self.activation}"


def variants(cuda: bool) -> list[Variant]:
    """What stage 2 checks: every mode at the seed shape (no bias, relu: the seed), sigmoid with bias, and ragged
    shapes (sizes that are not multiples of any block) — sized to compile in about a minute on a GPU."""
    if not cuda:  # the interpreter: small shapes, no bfloat16 / TF32
        small, ragged = (13, 29, 19, 7), (40, 24, 36, 5)
        return ([Variant(m, small, b, a) for m in ("fp32", "fp16", "fp64")
                 for b, a in ((False, "relu"), (True, "sigmoid"))]
                + [Variant("fp32", ragged, True, "relu")])
    ragged = (333, 100, 72, 33)
    return ([Variant(m, SEED, False, "relu") for m in ("fp32", "tf32", "bf16", "fp16", "fp64")]
            + [Variant(m, SEED, True, "sigmoid") for m in ("fp32", "bf16")]
            + [Variant(m, ragged, True, "relu") for m in ("fp32", "tf32", "bf16")]
            + [Variant("fp32", ragged, False, "sigmoid")])


def _make(v: Variant, device, dtype, seed=0):
    rows, n_in, hidden, out = v.shape
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = r(rows, n_in)
    w1, w2 = r(hidden, n_in) / n_in ** 0.5, r(out, hidden) / hidden ** 0.5
    b1, b2 = (r(hidden) * 0.5, r(out) * 0.5) if v.bias else (None, None)
    target = torch.randint(0, out, (rows,), generator=g)
    target[::7] = -100
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return [cast(t) for t in (x, w1, b1, w2, b2)], target.to(device)


def _graph(tensors, activation, dtype, head="log_softmax"):
    x, w1, b1, w2, b2 = (None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors)
    act = torch.relu if activation == "relu" else torch.sigmoid

    def forward():
        z = F.linear(act(F.linear(x, w1, b1)), w2, b2)
        return F.log_softmax(z, dim=-1) if head == "log_softmax" else z
    return [x, w1, b1, w2, b2], forward


def _compare(mode, rules, name, ours, exact, same) -> dict:
    err, bound = rules[mode](ours.detach().double(), exact.detach().double(), same.detach().double())
    finite = torch.isfinite(ours).all().item() or not torch.isfinite(exact).all().item()
    ok = bool(finite and (err <= bound).all().item())
    excess = float((err - bound).max()) if err.numel() else 0.0
    return dict(output=name, max_error=f"{float(err.max()) if err.numel() else 0.0:.3g}", worst_excess=f"{excess:.3g}",
                ok=ok)


def check_ops(v: Variant, device) -> list[dict]:
    """fused_mlp and fused_mlp_nll (mean over non-ignored rows): outputs and the five gradients."""
    dtype = DTYPES[v.mode]
    tensors, target = _make(v, device, dtype)
    live = [t for t in tensors if t is not None]
    ex_in, exact = _graph(tensors, v.activation, torch.float64)
    sm_in, same = _graph(tensors, v.activation, dtype)
    rows = []
    # a loss-sized output gradient (the tests' half-precision rule has an absolute 2e-3 term)
    dy = torch.randn(v.shape[0], v.shape[3], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dy /= v.shape[0]
    y = pyfused.fused_mlp(*tensors, v.activation)
    ry, sy = exact(), same()
    rows.append(dict(check="fused_mlp", **_compare(v.mode, RULES, "y", y, ry, sy)))
    grads = torch.autograd.grad(y, live, dy.to(device, dtype))
    rgrads = torch.autograd.grad(ry, [t for t in ex_in if t is not None], dy.to(device))
    sgrads = torch.autograd.grad(sy, [t for t in sm_in if t is not None], dy.to(device, dtype))
    names = [n for n, t in zip(("dx", "dw1", "db1", "dw2", "db2"), tensors) if t is not None]
    rows += [dict(check="fused_mlp", **_compare(v.mode, RULES, n, a, b, c))
             for n, a, b, c in zip(names, grads, rgrads, sgrads)]
    loss = pyfused.fused_mlp_nll(*tensors, target, activation=v.activation)
    rl, sl = F.nll_loss(exact(), target), F.nll_loss(same(), target)
    rows.append(dict(check="fused_mlp_nll", **_compare(v.mode, RULES, "loss", loss, rl, sl)))
    grads = torch.autograd.grad(loss, live)
    rgrads = torch.autograd.grad(rl, [t for t in ex_in if t is not None])
    sgrads = torch.autograd.grad(sl, [t for t in sm_in if t is not None])
    rows += [dict(check="fused_mlp_nll", **_compare(v.mode, RULES, n, a, b, c))
             for n, a, b, c in zip(names, grads, rgrads, sgrads)]
    return rows


def check_losses(v: Variant, device) -> list[dict]:
    """The logits head's losses: fused_mlp_cross_entropy and fused_mlp_mse (means), loss and every gradient."""
    dtype = DTYPES[v.mode]
    tensors, target = _make(v, device, dtype)
    live = [t for t in tensors if t is not None]
    names = [n for n, t in zip(("dx", "dw1", "db1", "dw2", "db2"), tensors) if t is not None]
    ex_in, exact = _graph(tensors, v.activation, torch.float64, "logits")
    sm_in, same = _graph(tensors, v.activation, dtype, "logits")
    values = torch.randn(v.shape[0], v.shape[3], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rows = []
    for name, fused, eager, t in (
            ("fused_mlp_cross_entropy", pyfused.fused_mlp_cross_entropy, F.cross_entropy, target),
            ("fused_mlp_mse", pyfused.fused_mlp_mse, F.mse_loss, values.to(device, dtype))):
        loss = fused(*tensors, t, activation=v.activation)
        rl = eager(exact(), t if t.dtype == torch.int64 else t.double())
        sl = eager(same(), t)
        rows.append(dict(check=name, **_compare(v.mode, RULES, "loss", loss, rl, sl)))
        rows += [dict(check=name, **_compare(v.mode, RULES, n, a, b, c)) for n, a, b, c in zip(
            names, torch.autograd.grad(loss, live), torch.autograd.grad(rl, [t for t in ex_in if t is not None]),
            torch.autograd.grad(sl, [t for t in sm_in if t is not None]))]
    return rows


def check_deep(v: Variant, device) -> list[dict]:
    """A three-layer chain (an extra hidden layer before the fused head): NLL and every gradient."""
    dtype = DTYPES[v.mode]
    (x, w1, b1, w2, b2), target = _make(v, device, dtype)
    g = torch.Generator().manual_seed(2)
    n_in = v.shape[1]
    w0 = (torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5).to(device, dtype).requires_grad_()
    params = (w0, w1, w2)
    biases = (None, b1, b2)
    acts = (v.activation, v.activation)
    loss = pyfused.fused_deep_mlp(x, params, biases, acts, target)
    live = [t for t in (x, w0, w1, b1, w2, b2) if t is not None]
    act = torch.relu if v.activation == "relu" else torch.sigmoid

    def graph(dt):
        ts = [t.detach().to(dt).requires_grad_() for t in live]
        it = iter(ts)
        xx, ww0, ww1 = next(it), next(it), next(it)
        bb1 = next(it) if b1 is not None else None
        ww2 = next(it)
        bb2 = next(it) if b2 is not None else None
        out = F.log_softmax(F.linear(act(F.linear(act(F.linear(xx, ww0)), ww1, bb1)), ww2, bb2), dim=-1)
        return ts, F.nll_loss(out, target)

    ex_in, rl = graph(torch.float64)
    sm_in, sl = graph(dtype)
    rows = [dict(check="fused_deep_mlp", **_compare(v.mode, RULES, "loss", loss, rl, sl))]
    names = ["dx", "dw0", "dw1"] + (["db1"] if b1 is not None else []) + ["dw2"] + (["db2"] if b2 is not None else [])
    for n, a, b, c in zip(names, torch.autograd.grad(loss, live), torch.autograd.grad(rl, ex_in),
                          torch.autograd.grad(sl, sm_in)):
        rows.append(dict(check="fused_deep_mlp", **_compare(v.mode, RULES, n, a, b, c)))
    return rows


def _seq(model, dtype, device):
    """nn.Sequential with the FusedMLP's parameters (copied) in ``dtype``."""
    act = torch.nn.ReLU() if model.activation == "relu" else torch.nn.Sigmoid()
    fc1, fc2 = model.fc1, model.fc2
    seq = torch.nn.Sequential(torch.nn.Linear(fc1.in_features, fc1.out_features, fc1.bias is not None), act,
                              torch.nn.Linear(fc2.in_features, fc2.out_features, fc2.bias is not None),
                              torch.nn.LogSoftmax(dim=-1)).to(device, dtype)
    with torch.no_grad():
        for a, b in zip(seq.parameters(), model.parameters()):
            a.copy_(b)
    return seq


def batches(v: Variant, device, steps, seed=5):
    g = torch.Generator().manual_seed(seed)
    rows, n_in, _, out = v.shape
    for _ in range(steps):
        t = torch.randint(0, out, (rows,), generator=g)
        t[::5] = -100
        yield torch.randn(rows, n_in, generator=g).to(device), t.to(device)


def check_training(v: Variant, device, steps=6) -> list[dict]:
    """FusedSGD on the module path and FusedTrainStep (captured too, on CUDA): ``steps`` momentum-SGD steps
    against nn.Sequential + torch.optim.SGD in float64 and in the same dtype; losses and final parameters."""
    dtype = DTYPES[v.mode]
    _, n_in, hidden, out = v.shape
    torch.manual_seed(0)
    base = pyfused.FusedMLP(n_in, hidden, out, v.bias, activation=v.activation).to(device, dtype)
    data = list(batches(v, device, steps))
    opts = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)

    def eager(dt):
        seq = _seq(base, dt, device)
        opt = torch.optim.SGD(seq.parameters(), **opts)
        losses = []
        for x, t in data:
            loss = F.nll_loss(seq(x.to(dt)), t)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        return torch.stack(losses), list(seq.parameters())

    exact_l, exact_p = eager(torch.float64)
    same_l, same_p = eager(dtype)
    runs = {}
    model = copy_model(base)
    opt = pyfused.FusedSGD(model.parameters(), **opts)
    losses = []
    for x, t in data:
        loss = model.nll_loss(x.to(dtype), t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.detach())
    runs["FusedMLP+FusedSGD"] = (torch.stack(losses), list(model.parameters()))
    model = copy_model(base)
    step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), **opts))
    runs["FusedTrainStep"] = (torch.stack([step(x.to(dtype), t) for x, t in data]), list(model.parameters()))
    if device.type == "cuda":
        model = copy_model(base)
        step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), **opts))
        step.capture(data[0][0].to(dtype), data[0][1])
        runs["FusedTrainStep captured"] = (torch.stack([step(x.to(dtype), t) for x, t in data]),
                                           list(model.parameters()))
    rows = []
    names = [n for n, _ in base.named_parameters()]
    for check, (losses, params) in runs.items():
        rows.append(dict(check=check, **_compare(v.mode, STEP_RULES, f"losses ({steps} steps)", losses, exact_l,
                                                 same_l)))
        rows += [dict(check=check, **_compare(v.mode, STEP_RULES, n, a, b, c))
                 for n, a, b, c in zip(names, params, exact_p, same_p)]
    return rows


# unaligned widths too, which keep the small tiles at any batch: the course's regression net's on CUDA, smaller
# ones on the interpreter
LARGE_WIDTHS = {"cuda": (1000, 100, 10), "cpu": (200, 50, 10)}


def check_large_batch(v: Variant, device) -> list[dict]:
    """:func:`check_training` at 16384 rows on CUDA, 3 steps — the large-batch tiles (128 rows in TF32 and 16-bit
    dtypes at the seed's widths), the split update, its 128-column tiles updated in parts (``EPILOGUE_N``) and the
    last layer's row partials (``rows.row_partials_pay``), and at :data:`LARGE_WIDTHS` the small tiles that
    unaligned widths keep —, and :func:`check_engine_steps` (Adam's 128-column tiles, in parts of 32) at the
    seed's widths and check_training at 1024 rows, hidden 1024 (128-row tiles with the hidden split; CUDA only);
    64 rows on the interpreter."""
    rows = 16384 if device.type == "cuda" else 64
    out = []
    for widths in (tuple(v.shape[1:]), LARGE_WIDTHS["cuda" if device.type == "cuda" else "cpu"]):
        got = check_training(dataclasses.replace(v, shape=(rows, *widths)), device, steps=3)
        out += [dict(r, check=f"{r['check']}, {rows} × {'→'.join(map(str, widths))}") for r in got]
    if device.type != "cuda":  # the interpreter runs check_engine_steps at the variant's own rows already
        return out
    # the 128-row tiles below 16384 rows with the hidden split and the row partials (rows × hidden ≥ 2^19)
    got = check_training(dataclasses.replace(v, shape=(1024, v.shape[1], 1024, v.shape[3])), device, steps=3)
    out += [dict(r, check=f"{r['check']}, 1024 × {v.shape[1]}→1024→{v.shape[3]}") for r in got]
    got = check_engine_steps(dataclasses.replace(v, shape=(rows, *v.shape[1:])), device, steps=3)
    return out + [dict(r, check=f"{r['check']}, {rows} rows") for r in got]


def check_engine_steps(v: Variant, device, steps=6) -> list[dict]:
    """FusedTrainStep of a three-layer logits model with FusedAdam on the MSE and with FusedAdamW (amsgrad) on
    cross-entropy, ``steps`` steps against nn.Sequential + torch.optim in float64 and in the same dtype: losses,
    final parameters."""
    dtype = DTYPES[v.mode]
    _, n_in, hidden, out = v.shape
    eps = 1e-8 if dtype.itemsize >= 4 else 1e-3  # 16-bit: a too small eps vanishes in the denominator
    rows = []
    for loss, fused_cls, torch_cls, options in (
            ("mse", pyfused.FusedAdam, torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2, eps=eps)),
            ("cross_entropy", pyfused.FusedAdamW, torch.optim.AdamW, dict(lr=1e-3, amsgrad=True, eps=eps))):
        torch.manual_seed(0)
        base = pyfused.DeepFusedMLP(n_in, hidden, hidden, out, activation=v.activation, bias=v.bias,
                                    log_softmax=False).to(device, dtype)
        g = torch.Generator().manual_seed(7)
        data = []
        for _ in range(steps):
            x = torch.randn(v.shape[0], n_in, generator=g)
            t = torch.randn(v.shape[0], out, generator=g) if loss == "mse" else \
                torch.randint(0, out, (v.shape[0],), generator=g)
            data.append((x.to(device), t.to(device)))

        def eager(dt):
            layers = []
            for i, fc in enumerate(base.linears()):
                layers.append(copy_model(fc).to(dt))
                if i < 2:
                    layers.append(torch.nn.ReLU() if v.activation == "relu" else torch.nn.Sigmoid())
            net = torch.nn.Sequential(*layers)
            opt = torch_cls(net.parameters(), **options)
            losses = []
            for x, t in data:
                value = (F.mse_loss(net(x.to(dt)), t.to(dt)) if loss == "mse"
                         else F.cross_entropy(net(x.to(dt)), t))
                value.backward()
                opt.step()
                opt.zero_grad()
                losses.append(value.detach())
            return torch.stack(losses), list(net.parameters())

        exact, same = eager(torch.float64), eager(dtype)
        model = copy_model(base)
        step = pyfused.FusedTrainStep(model, fused_cls(model.parameters(), **options), loss=loss)
        losses = torch.stack([step(x.to(dtype), t.to(dtype) if loss == "mse" else t) for x, t in data])
        check = f"FusedTrainStep {fused_cls.__name__} {loss}"
        rows.append(dict(check=check, **_compare(v.mode, STEP_RULES, f"losses ({steps} steps)", losses, exact[0],
                                                 same[0])))
        rows += [dict(check=check, **_compare(v.mode, ADAM_RULES, n, a, b, c)) for (n, a), b, c in
                 zip(model.named_parameters(), exact[1], same[1])]
    return rows


def check_drop_in(v: Variant, device) -> list[dict]:
    """The drop-in behaviours: under torch.autocast (16-bit modes) float32 parameters give the unfused graph's
    dtypes (log_softmax, NLL) and values against float64 and float32 gradients; in fp32, ``pyfused.fuse`` of an
    nn.Sequential against the same Sequential unfused, output and every gradient."""
    rows = []
    tensors, target = _make(v, device, torch.float32)
    live = [t for t in tensors if t is not None]
    names = [n for n, t in zip(("dx", "dw1", "db1", "dw2", "db2"), tensors) if t is not None]
    ex_in, exact = _graph(tensors, v.activation, torch.float64)
    if v.mode in ("bf16", "fp16"):
        amp = DTYPES[v.mode]
        sm_in, same = _graph(tensors, v.activation, torch.float32)
        with torch.autocast(device.type, amp):
            y, sy = pyfused.fused_mlp(*tensors, v.activation), same()
            loss = pyfused.fused_mlp_nll(*tensors, target, activation=v.activation)
            sl = F.nll_loss(same(), target)
        ok = y.dtype == sy.dtype and loss.dtype == sl.dtype
        rows.append(dict(check="autocast", output=f"dtypes {y.dtype}, {loss.dtype}", max_error="-",
                         worst_excess="-", ok=ok))
        rl = F.nll_loss(exact(), target)
        rows.append(dict(check="autocast", **_compare(v.mode, RULES, "y", y.float(), exact(), sy.float())))
        rows.append(dict(check="autocast", **_compare(v.mode, RULES, "loss", loss, rl, sl)))
        grads = torch.autograd.grad(loss, live)
        rows.append(dict(check="autocast", output="float32 gradients", max_error="-", worst_excess="-",
                         ok=all(g.dtype == torch.float32 for g in grads)))
        rows += [dict(check="autocast", **_compare(v.mode, RULES, n, a, b, c)) for n, a, b, c in zip(
            names, grads, torch.autograd.grad(rl, [t for t in ex_in if t is not None]),
            torch.autograd.grad(sl, [t for t in sm_in if t is not None]))]
    elif v.mode == "fp32":
        x, w1, b1, w2, b2 = (None if t is None else t.detach() for t in tensors)
        layers = [torch.nn.Linear(w1.shape[1], w1.shape[0], bias=b1 is not None),
                  torch.nn.ReLU() if v.activation == "relu" else torch.nn.Sigmoid(),
                  torch.nn.Linear(w2.shape[1], w2.shape[0], bias=b2 is not None), torch.nn.LogSoftmax(dim=-1)]
        model = torch.nn.Sequential(*layers).to(device)
        with torch.no_grad():
            for fc, w, b in ((model[0], w1, b1), (model[2], w2, b2)):
                fc.weight.copy_(w)
                if b is not None:
                    fc.bias.copy_(b)
        unfused = copy_model(model)
        pyfused.fuse(model)
        ours_loss, theirs_loss = F.nll_loss(model(x), target), F.nll_loss(unfused(x), target)
        rows.append(dict(check="fuse", **_compare("fp32", RULES, "loss", ours_loss, theirs_loss, theirs_loss)))
        for (name, p), q in zip(model.named_parameters(), unfused.parameters()):
            a, b = torch.autograd.grad(ours_loss, p, retain_graph=True)[0], torch.autograd.grad(
                theirs_loss, q, retain_graph=True)[0]
            rows.append(dict(check="fuse", **_compare("fp32", RULES, f"d{name}", a, b, b)))
    return rows


def check_split(v: Variant, device) -> list[dict]:
    """The split weight-gradient reduction at a batch that splits on this GPU (16384 rows; forced S = 3 at 100 rows
    on the interpreter): dW, db and dx against float64, and two launches bit-identical (the slices' partials
    summed in a fixed order whichever program arrives last)."""
    from pyfused.kernels import grads as G

    dtype = DTYPES[v.mode]
    rows = 16384 if device.type == "cuda" else 100
    _, n_in, hidden, out = v.shape
    g = torch.Generator().manual_seed(7)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x64, w64, a64, d64 = r(rows, n_in), [r(hidden, n_in), r(out, hidden)], r(rows, hidden), [r(rows, hidden),
                                                                                            r(rows, out)]
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    x, weights, acts, dpres = cast(x64), [cast(w) for w in w64], [cast(a64)], [cast(d) for d in d64]
    tiles = G.grads_config(rows, (n_in, hidden, out), dtype, "store")
    split = None if device.type == "cuda" else 3

    def run():
        outs = [torch.empty_like(weights[0]), x.new_empty(hidden), torch.empty_like(weights[1]), x.new_empty(out),
                torch.empty_like(x)]
        G.grads(x, weights, acts, dpres, need=(True, True), has_bias=(True, True), grads=outs[:4], dx=outs[4],
                split=split)
        return outs

    first, second = run(), run()
    d1, dz = (cast(d).double() for d in d64)  # the inputs as the kernel saw them
    xs, hs = x.double(), acts[0].double()
    exact = [d1.t() @ xs, d1.sum(0), dz.t() @ hs, dz.sum(0), d1 @ weights[0].double()]
    # the same-dtype reference: torch's own products in the storage dtype
    same = [(dpres[0].t() @ x), dpres[0].sum(0), dpres[1].t() @ acts[0], dpres[1].sum(0), dpres[0] @ weights[0]]
    s = split or G.split_count(rows, sum(G.tile_counts((n_in, hidden, out), tiles)), device)
    rows_out = [dict(check="split", output=f"S={s} ({tiles['BLOCK_K']}-row steps): repeat bit-identical",
                     max_error="-", worst_excess="-", ok=all(torch.equal(a, b) for a, b in zip(first, second)))]
    rows_out += [dict(check="split", **_compare(v.mode, RULES, n, a, b, c)) for n, a, b, c in zip(
        ("dw1", "db1", "dw2", "db2", "dx"), first, exact, same)]
    return rows_out


def check_hidden_split(v: Variant, device) -> list[dict]:
    """The row kernel's hidden split where it is taken on this GPU (B = 128, hidden 1024, the train step's row
    pass: 8 groups of 128 on an H200, 2 forced where the launcher would not split; forced G = 3 of 16-wide slices
    at 40 × 24 → 100 → 5 on the interpreter):
    activations, hidden gradients, dz and the per-block sums against float64, and two launches bit-identical
    (the logit partials summed in group order whichever program arrives last)."""
    from pyfused.kernels import rows as R

    dtype = DTYPES[v.mode]
    cuda = device.type == "cuda"
    rows, n_in, hidden, out = (128, 784, 1024, 10) if cuda else (40, 24, 100, 5)
    config = None if cuda else dict(BLOCK_M=16, BLOCK_K=16, BLOCK_H=16, BLOCK_OUT=16, num_warps=4, num_stages=2)
    g = torch.Generator().manual_seed(11)
    cast = lambda t: t.to(device, dtype)  # noqa: E731
    x, w1, b1 = cast(torch.randn(rows, n_in, generator=g)), cast(torch.randn(hidden, n_in, generator=g) / n_in ** .5), \
        cast(torch.randn(hidden, generator=g) * 0.1)
    w2, b2 = cast(torch.randn(out, hidden, generator=g) / hidden ** .5), cast(torch.randn(out, generator=g) * 0.1)
    target = torch.randint(0, out, (rows,), generator=g).to(device)
    cfg = config or R.rows_config(rows, (n_in, hidden, out), dtype, forward=True, backward=True,
                                  precision="tf32" if v.mode == "tf32" else "ieee")
    n_blocks = -(-rows // cfg["BLOCK_M"])
    # the launcher's G on a GPU (8 on an H200), or 2 where it would not split (a GPU of few SMs); 3 on the interpreter
    split = 3 if not cuda else (None if R.hidden_split(n_blocks, -(-hidden // cfg["BLOCK_H"]), device) > 1 else 2)
    seen = []

    def run():
        new = lambda *s: torch.empty(s, device=device, dtype=dtype)  # noqa: E731
        outs = dict(acts=new(rows, hidden), dpres=new(rows, hidden), dz=new(rows, out),
                    stats=torch.empty(n_blocks, 2, device=device, dtype=torch.promote_types(dtype, torch.float32)))
        from pyfused.kernels.launch import observe
        with observe(seen.append):
            R.rows(x, [w1, w2], [b1, b2], ("relu",), loss="class", target=target, acts=[outs["acts"]],
                   dpres=[outs["dpres"]], dz=outs["dz"], stats=outs["stats"], split=split, config=config)
        return outs

    first, second = run(), run()
    groups = seen[0].grid[0] // n_blocks

    def reference(dt):
        ref = torch_ops.row_pass(x.to(dt), [w1.to(dt), w2.to(dt)], [b1.to(dt), b2.to(dt)], ("relu",), "class",
                                 target, cfg["BLOCK_M"])
        return dict(acts=ref["acts"][0], dpres=ref["dpres"][0], dz=ref["dz"], stats=ref["stats"][:, 0])

    exact, same = reference(torch.float64), reference(dtype)
    out_rows = [dict(check="hidden split", output=f"G={groups}: repeat bit-identical", max_error="-",
                     worst_excess="-", ok=groups > 1 and all(torch.equal(first[k], second[k]) for k in first))]
    first["stats"] = first["stats"][:, 0]
    out_rows += [dict(check="hidden split", **_compare(v.mode, RULES, name, first[name], exact[name], same[name]))
                 for name in ("acts", "dpres", "dz", "stats")]
    return out_rows


LARGE_MODES = ("fp32", "tf32", "bf16")  # the large-batch step (each its own tiles) at the first shape
DEEP_MODES = ("fp32", "bf16", "fp16")  # the deeper chain is checked at the first shape in these modes
ENGINE_MODES = ("fp32", "tf32", "bf16", "fp16", "fp64")  # the engine's losses and Adam: at the first shape


def stage_correctness(report: Report, device: torch.device) -> None:
    cuda = device.type == "cuda"
    todo = variants(cuda)
    rows, cut = [], False
    with kernel_backend(cuda):
        for v in todo:
            if report.out_of_time(reserve_s=0.6 * report.budget_s):
                cut = True
                break
            for check in (check_ops, check_losses, check_deep, check_training, check_engine_steps, check_drop_in,
                          check_split, check_hidden_split, check_large_batch):
                if check is check_large_batch and (v.shape != todo[0].shape or v.mode not in LARGE_MODES):
                    continue
                if check in (check_deep, check_drop_in, check_split, check_hidden_split) and (
                        v.shape != todo[0].shape or v.mode not in DEEP_MODES):
                    continue
                if check is check_engine_steps and (v.shape != todo[0].shape or v.mode not in ENGINE_MODES):
                    continue
                try:
                    with with_precision(v.mode):
                        got = check(v, device)
                except Exception as error:  # noqa: BLE001  (a crash is a failed check, not a failed run)
                    traceback.print_exc()
                    got = [dict(check=check.__name__, output="-", max_error="-", worst_excess="-", ok=False,
                                error=f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")]
                rows += [dict(r, variant=v.label()) for r in got]
            _correctness_report(report, rows, cuda, "running")
    _correctness_report(report, rows, cuda, "cut short (budget)" if cut else "done")


def _correctness_report(report: Report, rows: list[dict], cuda: bool, state: str) -> None:
    """The correctness section and CSV from the rows so far (rewritten after every variant)."""
    failed = [r for r in rows if not r["ok"]]
    by_check = {}
    for r in rows:
        n, bad = by_check.get((r["variant"], r["check"]), (0, 0))
        by_check[(r["variant"], r["check"])] = (n + 1, bad + (not r["ok"]))
    lines = [f"Tolerances (the tests'): {_rules_text()}. "
             + ("Kernels on CUDA." if cuda else "Kernels on Triton's interpreter (no CUDA), at small shapes."), ""]
    lines += table(["variant", "check", "outputs", "failed"],
                    [[k[0], k[1], n, bad] for k, (n, bad) in by_check.items()])
    if failed:
        lines += ["", "Failures:", ""]
        lines += table(["variant", "check", "output", "max error", "worst excess", "error"],
                        [[r["variant"], r["check"], r["output"], r["max_error"], r["worst_excess"], r.get("error", "")]
                         for r in failed[:40]])
    report.csv["correctness"] = []
    report.rows("correctness", rows)
    status = "fail" if failed else {"done": "pass"}.get(state, state)
    report.set("correctness", status, f"{len(rows) - len(failed)}/{len(rows)} outputs within tolerance over "
               f"{len({r['variant'] for r in rows})} variants", lines)


def _rules_text() -> str:
    return ("float32 |err| ≤ 1e-4 + 1e-4·|ref| (after steps 1e-5 + 1e-4·|ref|), TF32 2e-2, float64 1e-10, "
            "bfloat16/float16 |ours − ref64| ≤ 2·|torch same dtype − ref64| + 2e-3 elementwise (Adam's parameters: "
            "per tensor in norm, + 1e-3)")
