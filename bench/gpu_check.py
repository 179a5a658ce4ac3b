"""``python -m bench.gpu_check --out DIR``: the whole verdict on a GPU in one short run.

A GPU is lent to this project a few minutes at a time, bare each time (``pip install --no-deps -e .``, then this
command). In that time, in this order, and writing ``DIR/report.md`` (and a few CSV files) after every stage, so
that a run cut short still leaves a report:

1. **environment**: GPU name, compute capability, SMs, memory, L2, driver and clocks (``nvidia-smi``), torch,
   triton, numpy, Python, the pyfused commit;
2. **correctness** on CUDA: the kernel variants (float32 IEEE, TF32, bfloat16, float16, float64; bias or none;
   relu and sigmoid; the seed shape and ragged ones) against float64 PyTorch — forward and backward of the
   fused ops, a deeper chain, FusedSGD, FusedTrainStep with and without CUDA-graph capture — with the test
   suite's tolerances (:data:`RULES`);
3. **launches**: kernels per FusedTrainStep call and per module-path step (counted at pyfused's launcher and,
   on CUDA, by torch.profiler), and that a captured step replays the eager result bit for bit;
4. **seed job**: ``pyfused-train --data synthetic --epochs 2 --device cuda --reference`` (loss agreement, speed);
5. **timings** (``triton.testing.do_bench`` medians, side by side, each implementation checked first by the
   benchmark's gate): the seed step at B = 128 for eager, torch.compile (default, reduce-overhead),
   CUDA-graphed eager, FusedMLP + FusedSGD, FusedTrainStep and its captured form; each pyfused launch alone at
   B = 128, 4096, 16384, 65536 (784 → 128 → 10; fp32, TF32, bf16); the step at those B against its roofline;
6. **registers**: what the driver's compile of each kernel of a seed step reports (registers, spills) against
   the committed compile report ``bench/results/compile/<arch>.md``.

Stages stop early when ``--budget-s`` (default 420) runs out and say so. Without CUDA, stage 2 runs the kernels
on Triton's interpreter at small shapes (float32, float16, float64: the interpreter has no bfloat16, and TF32
is a tensor-core format) and stages 4–6 are "skipped: no CUDA"; CI runs it that way.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the kernels run on Triton's interpreter: it must be on before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import pyfused  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("environment", "correctness", "launches", "seed_job", "timings", "registers")
SEED = (128, 784, 128, 10)
TIMING_BATCHES = (128, 4096, 16384, 65536)
TIMING_DTYPES = ("fp32", "tf32", "bf16")
SEED_STEP_IMPLS = ("eager", "compile_default", "compile_reduce_overhead", "eager_cudagraph", "pyfused",
                   "fused_train_step", "fused_train_step_cudagraph")
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


# ----------------------------------------------------------------------------------------------- tolerances
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
# FusedSGD / FusedTrainStep after several steps, against the same computation by torch in float64 / same dtype
STEP_RULES = {"fp32": _absolute(1e-5, 1e-4), "tf32": _absolute(2e-2, 2e-2), "bf16": _flash, "fp16": _flash,
              "fp64": _absolute(1e-10, 1e-10)}


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


# ----------------------------------------------------------------------------------------------- the report
class Report:
    """Stage results, tables and CSV rows, written to ``out`` after every stage (and on every :meth:`write`)."""

    def __init__(self, out: Path, command: str, budget_s: float) -> None:
        self.out, self.command, self.budget_s = out, command, budget_s
        self.start = time.monotonic()
        self.stamp = _stamp(command)
        self.stages = {name: ("not reached", "") for name in STAGES}
        self.sections = {name: [] for name in STAGES}
        self.csv = {}
        out.mkdir(parents=True, exist_ok=True)

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def out_of_time(self, reserve_s: float = 0.0) -> bool:
        return self.left_s() <= reserve_s

    def rows(self, name: str, rows: list[dict]) -> None:
        """Add rows to ``DIR/<name>.csv`` (each stamped with device, versions, date and command)."""
        self.csv.setdefault(name, []).extend(dict(r, **self.stamp) for r in rows)

    def set(self, stage: str, status: str, summary: str, lines: list[str] | None = None) -> None:
        self.stages[stage] = (status, summary)
        if lines is not None:
            self.sections[stage] = lines
        self.write()

    def write(self) -> None:
        s = self.stamp
        lines = [f"# pyfused GPU check: {s['device']}", "",
                 f"`{s['command']}` on {s['date']} — torch {s['torch']}, triton {s['triton']}, "
                 f"CUDA {s['cuda']}, driver {s['driver']}, pyfused {s['commit']}; budget {self.budget_s:g} s, "
                 f"{time.monotonic() - self.start:.0f} s used.", "",
                 "| stage | status | summary |", "|---|---|---|"]
        lines += [f"| {i}. {name} | {status} | {summary} |"
                  for i, (name, (status, summary)) in enumerate(self.stages.items(), 1)]
        for i, name in enumerate(STAGES, 1):
            if self.sections[name]:
                lines += ["", f"## {i}. {name}", "", *self.sections[name]]
        (self.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
        for name, rows in self.csv.items():
            columns = list(dict.fromkeys(k for r in rows for k in r))
            with open(self.out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, columns)
                writer.writeheader()
                writer.writerows(rows)


def _git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (done.stdout.strip() or "?") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _nvidia_smi(fields: str) -> list[str] | None:
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0 or not done.stdout.strip():
        return None
    return [v.strip() for v in done.stdout.splitlines()[0].split(",")]


def _stamp(command: str) -> dict:
    import triton

    cuda = torch.cuda.is_available()
    smi = _nvidia_smi("driver_version") if cuda else None
    return dict(device=torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
                torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda or "-",
                driver=smi[0] if smi else "-", commit=_git_commit(), command=command,
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)]


# ----------------------------------------------------------------------------------------------- 1. environment
def stage_environment(report: Report, device: torch.device) -> None:
    import numpy

    import triton

    facts = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
             "numpy": numpy.__version__, "pyfused commit": report.stamp["commit"],
             "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
             "PYFUSED_BACKEND": os.environ.get("PYFUSED_BACKEND", "auto")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update({"GPU": props.name, "compute capability": f"{props.major}.{props.minor}",
                      "SMs": props.multi_processor_count, "memory": f"{props.total_memory / 2**30:.1f} GiB",
                      "L2": f"{getattr(props, 'L2_cache_size', 0) / 2**20:.0f} MiB",
                      "CUDA (torch)": torch.version.cuda})
        smi = _nvidia_smi("driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
                          "temperature.gpu,persistence_mode")
        names = ("driver", "SM clock (MHz)", "max SM clock (MHz)", "memory clock (MHz)", "max memory clock (MHz)",
                 "power limit (W)", "temperature (C)", "persistence mode")
        facts.update(dict(zip(names, smi)) if smi else {"nvidia-smi": "not readable"})
    else:
        facts["CPU"] = report.stamp["device"]
        facts["threads"] = torch.get_num_threads()
    lines = _table(["fact", "value"], [[k, v] for k, v in facts.items()])
    report.rows("environment", [{"fact": k, "value": v} for k, v in facts.items()])
    report.set("environment", "pass", report.stamp["device"], lines)


# ----------------------------------------------------------------------------------------------- 2. correctness
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


def _graph(tensors, activation, dtype):
    x, w1, b1, w2, b2 = (None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors)
    act = torch.relu if activation == "relu" else torch.sigmoid
    return [x, w1, b1, w2, b2], lambda: F.log_softmax(F.linear(act(F.linear(x, w1, b1)), w2, b2), dim=-1)


def _compare(mode, rules, name, ours, exact, same) -> dict:
    err, bound = rules[mode](ours.detach().double(), exact.detach().double(), same.detach().double())
    finite = torch.isfinite(ours).all().item() or not torch.isfinite(exact).all().item()
    ok = bool(finite and (err <= bound).all().item())
    excess = float((err - bound).max()) if err.numel() else 0.0
    return dict(output=name, max_error=f"{float(err.max()) if err.numel() else 0.0:.3g}", worst_excess=f"{excess:.3g}",
                ok=ok)


def _with_precision(mode):
    sys.path.insert(0, str(ROOT))
    from bench.cases import precision

    return precision(mode)


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


def _batches(v: Variant, device, steps, seed=5):
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
    data = list(_batches(v, device, steps))
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
    model = _copy(base)
    opt = pyfused.FusedSGD(model.parameters(), **opts)
    losses = []
    for x, t in data:
        loss = model.nll_loss(x.to(dtype), t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        losses.append(loss.detach())
    runs["FusedMLP+FusedSGD"] = (torch.stack(losses), list(model.parameters()))
    model = _copy(base)
    step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), **opts))
    runs["FusedTrainStep"] = (torch.stack([step(x.to(dtype), t) for x, t in data]), list(model.parameters()))
    if device.type == "cuda":
        model = _copy(base)
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


def _copy(model):
    import copy

    return copy.deepcopy(model)


DEEP_MODES = ("fp32", "bf16", "fp16")  # the deeper chain is checked at the first shape in these modes


def stage_correctness(report: Report, device: torch.device) -> None:
    cuda = device.type == "cuda"
    todo = variants(cuda)
    rows, cut = [], False
    with _kernel_backend(cuda):
        for v in todo:
            if report.out_of_time(reserve_s=0.6 * report.budget_s):
                cut = True
                break
            for check in (check_ops, check_deep, check_training):
                if check is check_deep and (v.shape != todo[0].shape or v.mode not in DEEP_MODES):
                    continue
                try:
                    with _with_precision(v.mode):
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
    lines += _table(["variant", "check", "outputs", "failed"],
                    [[k[0], k[1], n, bad] for k, (n, bad) in by_check.items()])
    if failed:
        lines += ["", "Failures:", ""]
        lines += _table(["variant", "check", "output", "max error", "worst excess", "error"],
                        [[r["variant"], r["check"], r["output"], r["max_error"], r["worst_excess"], r.get("error", "")]
                         for r in failed[:40]])
    report.csv["correctness"] = []
    report.rows("correctness", rows)
    status = "fail" if failed else {"done": "pass"}.get(state, state)
    report.set("correctness", status, f"{len(rows) - len(failed)}/{len(rows)} outputs within tolerance over "
               f"{len({r['variant'] for r in rows})} variants", lines)


def _rules_text() -> str:
    return ("float32 |err| ≤ 1e-4 + 1e-4·|ref| (after steps 1e-5 + 1e-4·|ref|), TF32 2e-2, float64 1e-10, "
            "bfloat16/float16 |ours − ref64| ≤ 2·|torch same dtype − ref64| + 2e-3")


@contextlib.contextmanager
def _kernel_backend(cuda: bool):
    """The Triton kernels for every check: on CUDA by default; on CPU through the interpreter."""
    saved = os.environ.get("PYFUSED_BACKEND")
    os.environ["PYFUSED_BACKEND"] = "auto" if cuda else "triton"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYFUSED_BACKEND", None)
        else:
            os.environ["PYFUSED_BACKEND"] = saved


# ----------------------------------------------------------------------------------------------- 3. launches
def _count_launches(fn, calls=3) -> tuple[float, list[str]]:
    """Launches per call of ``fn`` at pyfused's launcher (after one warm-up call), and their kernel names."""
    from pyfused.kernels.launch import observe

    fn()
    seen = []
    with observe(lambda launched: seen.append(launched.name)):
        for _ in range(calls):
            fn()
    return len(seen) / calls, list(dict.fromkeys(seen))


def _profiled_kernels(fn, device, calls=3) -> tuple[float, list[str]]:
    """CUDA kernels per call of ``fn`` seen by torch.profiler (every kernel, pyfused's or PyTorch's)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize(device)
    names = [e.name for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
             and not e.name.startswith(("Memcpy", "Memset", "cudaMemcpy"))]
    return len(names) / calls, list(dict.fromkeys(names))


def stage_launches(report: Report, device: torch.device) -> None:
    cuda = device.type == "cuda"
    rows_, n_in, hidden, out = SEED if cuda else (16, 32, 24, 10)
    v = Variant("fp32", (rows_, n_in, hidden, out), False, "relu")
    x, t = next(_batches(v, device, 1))
    lines, rows, problems = [], [], []
    with _kernel_backend(cuda):
        torch.manual_seed(0)
        model = pyfused.FusedMLP(n_in, hidden, out, bias=False).to(device)
        step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), lr=0.15, momentum=0.9))
        module = _copy(model)
        opt = pyfused.FusedSGD(module.parameters(), lr=0.15, momentum=0.9)

        def module_step():
            module.nll_loss(x, t).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        work = {"FusedTrainStep call": lambda: step(x, t), "module step (FusedMLP.nll_loss, backward, FusedSGD)":
                module_step}
        for name, fn in work.items():
            per_call, kernels = _count_launches(fn)
            row = dict(what=name, pyfused_launches=per_call, kernels=" ".join(kernels))
            if cuda:
                profiled, names = _profiled_kernels(fn, device)
                row.update(cuda_kernels=profiled, cuda_kernel_names=" ".join(n[:40] for n in names))
            rows.append(row)
        if rows[0]["pyfused_launches"] != 2:
            problems.append(f"FusedTrainStep made {rows[0]['pyfused_launches']} launches per call, not 2")
        if cuda:
            eager_model, graph_model = _copy(model), _copy(model)
            opts = dict(lr=0.15, momentum=0.9)
            eager_step = pyfused.FusedTrainStep(eager_model, pyfused.FusedSGD(eager_model.parameters(), **opts))
            graph_step = pyfused.FusedTrainStep(graph_model, pyfused.FusedSGD(graph_model.parameters(), **opts))
            graph_step.capture(x, t)
            data = list(_batches(v, device, 5, seed=9))
            el = [eager_step(a, b) for a, b in data]
            gl = [graph_step(a, b) for a, b in data]
            same = all(torch.equal(a, b) for a, b in zip(el, gl)) and all(
                torch.equal(a, b) for a, b in zip(eager_model.parameters(), graph_model.parameters()))
            rows.append(dict(what="captured FusedTrainStep replays the eager step (5 steps, losses and parameters "
                                  "bit for bit)", pyfused_launches="", kernels="yes" if same else "NO"))
            if not same:
                problems.append("the captured step does not replay the eager result bit for bit")
    report.rows("launches", rows)
    header = ["what", "launches at pyfused's launcher", "kernels"]
    header += ["CUDA kernels (profiler)", "names"] if cuda else []
    lines += _table(header, [[r["what"], r["pyfused_launches"], r["kernels"]]
                             + ([r.get("cuda_kernels", ""), r.get("cuda_kernel_names", "")] if cuda else [])
                             for r in rows])
    if not cuda:
        lines += ["", "No CUDA: counted on Triton's interpreter at a small shape; the profiler count and the "
                  "capture check need CUDA."]
    report.set("launches", "fail" if problems else "pass", "; ".join(problems) or
               f"FusedTrainStep {rows[0]['pyfused_launches']:g} launches per call, module step "
               f"{rows[1]['pyfused_launches']:g}", lines)


# ----------------------------------------------------------------------------------------------- 4. seed job
def stage_seed_job(report: Report, device: torch.device, epochs=2, extra=()) -> None:
    out = report.out / "seed_job.json"
    cmd = [sys.executable, "-m", "pyfused.train", "--data", "synthetic", "--epochs", str(epochs), "--device",
           device.type, "--reference", "--quiet", "--json", str(out), *extra]
    timeout = max(30.0, report.left_s() - 60)
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        report.set("seed_job", "cut short (budget)", f"no result within {timeout:.0f} s")
        return
    command = "python -m pyfused.train " + shlex.join(cmd[3:])
    if done.returncode != 0 or not out.exists():
        lines = ["```", (done.stdout + done.stderr)[-3000:], "```"]
        report.set("seed_job", "fail", f"`{command}` exited {done.returncode}", lines)
        return
    result = json.loads(out.read_text())
    diff, speed = result["max_loss_rel_diff"], result["speedup"]
    fused, ref = result["pyfused"][-1], result["reference"][-1]
    report.rows("seed_job", [dict(max_loss_rel_diff=diff, speedup=speed, fused_samples_per_s=fused["samples_per_s"],
                                  reference_samples_per_s=ref["samples_per_s"], fused_test_acc=fused["test_acc"],
                                  reference_test_acc=ref["test_acc"], job=command)])
    lines = [f"`{command}`", "", *_table(
        ["run", "final train loss", "test accuracy", "samples/s (last epoch)"],
        [["pyfused", f"{fused['train_loss']:.6f}", f"{100 * fused['test_acc']:.2f}%", f"{fused['samples_per_s']:,.0f}"],
         ["reference (eager)", f"{ref['train_loss']:.6f}", f"{100 * ref['test_acc']:.2f}%",
          f"{ref['samples_per_s']:,.0f}"]]),
        "", f"Max relative train-loss difference per epoch {diff:.2e}; speed ratio pyfused/reference {speed:.2f}×."]
    ok = diff <= 1e-3
    report.set("seed_job", "pass" if ok else "fail", f"loss agreement {diff:.1e}, {speed:.2f}× the eager loop", lines)


# ----------------------------------------------------------------------------------------------- 5. timings
def _do_bench(fn) -> float:
    """Median µs of ``fn``: triton's do_bench on CUDA (L2 flushed per call), perf_counter medians on CPU."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3
    times = []
    for _ in range(7):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def time_seed_step(report: Report, device: torch.device, impls=SEED_STEP_IMPLS, batch=SEED[0], dims=SEED[1:]):
    """The seed step at ``batch``, every implementation built, gate-checked and timed together (bench.run)."""
    sys.path.insert(0, str(ROOT))
    from bench import cases, roofline, run

    cfg = cases.Config("train_step", batch, dims[0], dims[1], dims[2], "fp32", 0.0, False)
    listed = [i for i in cases.IMPLS if i.name in impls and i.unavailable("train_step", device.type) is None]
    args = argparse.Namespace(rounds=3, reps=20, budget_s=1.0, retries=0, max_others=1.0, pause_s=0.0)
    peak = roofline.peak_for(report.stamp["device"]) if device.type == "cuda" else None
    return run.measure(cfg, listed, device, args, peak, log=lambda *a: None)


def time_launches(report: Report, device: torch.device, batches=TIMING_BATCHES, dtypes=TIMING_DTYPES,
                  dims=SEED[1:]) -> list[dict]:
    """Each launch of FusedTrainStep and of the module step alone, and the whole step, at each batch and dtype;
    the step against its roofline."""
    from pyfused.kernels.launch import observe

    sys.path.insert(0, str(ROOT))
    from bench import roofline
    from bench.cases import precision

    peak = roofline.peak_for(report.stamp["device"]) if device.type == "cuda" else None
    n_in, hidden, out = dims
    rows = []
    for dtype_name in dtypes:
        for batch in batches:
            if report.out_of_time(reserve_s=0.25 * report.budget_s):
                return rows
            with precision(dtype_name):
                dtype = DTYPES[dtype_name]
                torch.manual_seed(0)
                model = pyfused.FusedMLP(n_in, hidden, out, bias=False).to(device, dtype)
                g = torch.Generator(device=device).manual_seed(1)
                x = torch.randn(batch, n_in, device=device, generator=g).to(dtype)
                t = torch.randint(0, out, (batch,), device=device, generator=g)
                step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), lr=1e-4, momentum=0.9))
                module = _copy(model)
                opt = pyfused.FusedSGD(module.parameters(), lr=1e-4, momentum=0.9)

                def module_step():
                    module.nll_loss(x, t).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=False)

                for what, fn in (("FusedTrainStep", lambda: step(x, t)), ("module step", module_step)):
                    fn()
                    launched = []
                    with observe(launched.append):
                        fn()
                    for i, one in enumerate(launched):
                        rows.append(dict(what=f"{what} launch {i + 1}: {one.name}", batch=batch, dtype=dtype_name,
                                         grid=one.grid[0], median_us=f"{_do_bench(one.again):.2f}"))
                    step_us = _do_bench(fn)
                    elem = torch.finfo(dtype).bits // 8
                    flops, nbytes = roofline.work("train_step", batch, n_in, hidden, out, False, elem, 0.9)
                    bound = peak.bound_s(flops, nbytes, dtype_name) * 1e6 if peak else None
                    rows.append(dict(what=f"{what} (whole call)", batch=batch, dtype=dtype_name, grid="",
                                     median_us=f"{step_us:.2f}", roofline_us=f"{bound:.2f}" if bound else "n/a",
                                     x_roofline=f"{step_us / bound:.1f}" if bound else "n/a"))
                if device.type == "cuda":
                    step.capture(x, t)
                    captured = _do_bench(lambda: step(x, t))
                    rows.append(dict(what="FusedTrainStep captured (whole call)", batch=batch, dtype=dtype_name,
                                     grid="", median_us=f"{captured:.2f}",
                                     roofline_us=f"{bound:.2f}" if bound else "n/a",
                                     x_roofline=f"{captured / bound:.1f}" if bound else "n/a"))
    return rows


def stage_timings(report: Report, device: torch.device, **sizes) -> None:
    lines, status = [], "pass"
    seed_rows = time_seed_step(report, device, **sizes.get("seed", {}))
    report.rows("timings_seed_step", seed_rows)
    lines += ["Seed step (B = 128, 784 → 128 → 10, fp32 IEEE, no bias, SGD momentum 0), `do_bench` medians:", ""]
    lines += _table(["implementation", "median µs", "× eager", "setup s", "status"],
                    [[r["impl"], r["median_us"], r["speedup_vs_eager"], r["setup_s"], r["status"]] for r in seed_rows])
    if any(r["status"] != "ok" and r["impl"].startswith(("pyfused", "fused")) for r in seed_rows):
        status = "fail"
    report.set("timings", "running", "seed step timed", lines)
    launch_rows = time_launches(report, device, **sizes.get("launches", {}))
    report.rows("timings_launches", launch_rows)
    lines += ["", "Each pyfused launch alone and the whole step (784 → 128 → 10, no bias, momentum 0.9), `do_bench`"
              " medians; roofline = max(compulsory bytes / HBM bandwidth, FLOPs / dense peak) (bench/roofline.py):",
              ""]
    lines += _table(["what", "B", "dtype", "grid", "median µs", "roofline µs", "× roofline"],
                    [[r["what"], r["batch"], r["dtype"], r["grid"], r["median_us"], r.get("roofline_us", ""),
                      r.get("x_roofline", "")] for r in launch_rows])
    expected = len(sizes.get("launches", {}).get("batches", TIMING_BATCHES)) * len(
        sizes.get("launches", {}).get("dtypes", TIMING_DTYPES))
    done = len({(r["batch"], r["dtype"]) for r in launch_rows})
    if done < expected and status == "pass":
        status = "cut short (budget)"
    best = next((r for r in seed_rows if r["impl"] == "fused_train_step_cudagraph" and r["median_us"]), None) or \
        next((r for r in seed_rows if r["impl"] == "fused_train_step" and r["median_us"]), None)
    summary = f"seed step {best['impl']} {best['median_us']} µs ({best['speedup_vs_eager']}× eager)" if best else \
        "no pyfused seed-step time"
    report.set("timings", status, summary + f"; {done}/{expected} (B, dtype) points of the sweep", lines)


# ----------------------------------------------------------------------------------------------- 6. registers
def committed_report(arch: str) -> dict:
    """(kernel label, mode, bias) → (regs, spill text) from the committed ``bench/results/compile/<arch>.md``."""
    path = ROOT / "bench" / "results" / "compile" / f"{arch}.md"
    if not path.exists():
        return {}
    table, found = {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## Seed shape"):
            found = True
            continue
        if found and line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if found and len(cells) >= 7 and cells[0] not in ("kernel", "---"):
            table[(cells[0], cells[1], cells[2])] = (cells[5], cells[6].replace("*", ""))
    return table


def stage_registers(report: Report, device: torch.device) -> None:
    import importlib

    from bench import gpu_compile as gc
    from pyfused.kernels.launch import observe

    props = torch.cuda.get_device_properties(device)
    arch = f"sm_{props.major}{props.minor}"
    arch = arch if arch in gc.ARCHS else "sm_90" if props.major >= 9 else "sm_80"
    committed = committed_report(arch)
    rows, spilled = [], []
    for case in gc.seed_cases(gc.SEED_KERNELS, (arch,)):
        if case.mode not in ("fp32", "tf32", "bf16") or case.bias or case.activation != "relu":
            continue
        if report.out_of_time(reserve_s=5):
            break
        module_name, _, _ = gc.ALL_KERNELS[case.kernel]
        module = importlib.import_module(f"pyfused.kernels.{module_name}")
        seen = []
        try:
            with _with_precision(case.mode), observe(seen.append):
                gc._call_launcher(case, module, device)
            torch.cuda.synchronize(device)
            compiled = seen[-1].compiled
            regs, spills = getattr(compiled, "n_regs", "?"), getattr(compiled, "n_spills", "?")
        except Exception as error:  # noqa: BLE001
            regs, spills = "error", f"{type(error).__name__}: {str(error)[:120]}"
        label = case.kernel
        want = committed.get((label, case.mode, "no"), ("?", "?"))
        rows.append(dict(kernel=label, mode=case.mode, driver_regs=regs, driver_spills=spills,
                         committed_regs=want[0], committed_spill=want[1],
                         same_regs="yes" if str(regs) == want[0] else "no"))
        if isinstance(spills, int) and spills:
            spilled.append(f"{label} {case.mode}")
    report.rows("registers", rows)
    lines = [f"Kernels of a seed step (no bias, relu) compiled by this machine's Triton/driver for {arch}, against "
             f"the committed `bench/results/compile/{arch}.md` (bundled ptxas). Spills are bytes reported by the "
             "driver's compile.", ""]
    lines += _table(["kernel", "mode", "regs (driver)", "spills (driver)", "regs (committed)", "spill (committed)",
                     "same regs"], [[r[k] for k in ("kernel", "mode", "driver_regs", "driver_spills", "committed_regs",
                                                    "committed_spill", "same_regs")] for r in rows])
    same = sum(r["same_regs"] == "yes" for r in rows)
    report.set("registers", "fail" if spilled else "pass",
               (f"spills in {', '.join(spilled)}; " if spilled else "no spills; ")
               + f"{same}/{len(rows)} register counts as committed", lines)


# ----------------------------------------------------------------------------------------------- driver
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for report.md and the CSV files")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default 420)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(args.out, "python -m bench.gpu_check " + shlex.join(argv), args.budget_s)
    needs_cuda = {"seed_job", "timings", "registers"}
    for name in STAGES:
        if name not in args.stages:
            report.set(name, "skipped: not asked for", "")
            continue
        if name in needs_cuda and device.type != "cuda":
            report.set(name, "skipped: no CUDA", "")
            continue
        if report.out_of_time():
            report.set(name, "skipped: budget spent", "")
            continue
        print(f"[gpu_check] {name} ({report.left_s():.0f} s left)", flush=True)
        try:
            globals()[f"stage_{name}"](report, device)
        except Exception as error:  # noqa: BLE001  (the report says what broke; later stages still run)
            traceback.print_exc()
            report.set(name, "error", f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
    report.write()
    print(f"[gpu_check] wrote {args.out / 'report.md'}", flush=True)
    return 1 if any(status in ("fail", "error") for status, _ in report.stages.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
