"""``python -m bench``: pyfused against PyTorch's best, side by side, checked before timed.

For every config (case × batch × hidden × dtype × momentum) each listed implementation is built, warmed up
(its setup time — compilation, autotuning, Triton JIT, graph capture — measured and reported apart), checked
against eager PyTorch (bench/cases.py), then timed:

- CUDA: ``triton.testing.do_bench`` per-call times (it flushes L2 before each call), ``--rounds`` rounds with
  the implementations interleaved, median of all calls;
- CPU: ``time.perf_counter`` around each call, ``--reps`` calls per implementation (fewer when one call takes
  longer than ``--budget-s / --reps``, never fewer than 20) split over ``--rounds`` rounds in which the
  implementations take turns, garbage collector paused; the median of the per-call times. On a shared
  machine the harness first waits (``--pause-s`` at a time, at most ``--retries`` times) until other processes
  use at most ``--max-others`` of the CPUs, and records the share they took while the config was timed
  (column ``others_cpu``). ``python -m bench`` sets ``OMP_WAIT_POLICY=ACTIVE`` unless it is set (see
  :mod:`bench.__main__`).

Rows go to ``results.csv`` after every config (``--merge`` keeps the folder's earlier rows for points not
re-measured, so a long GPU sweep can run in pieces), then ``results.md`` and ``speedup_<case>.png``.
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import math
import os
import sys
import time
from pathlib import Path

import torch

from bench import cases, report, roofline

FULL = dict(batch=(128, 1024, 8192, 65536), hidden=(128, 512, 1024), momentum=(0.0, 0.9))
QUICK = {"cuda": dict(batch=(128, 8192), hidden=(128,), momentum=(0.0, 0.9)),
         "cpu": dict(batch=(128, 1024), hidden=(128,), momentum=(0.0, 0.9))}
DTYPES = {"cuda": ("fp32", "tf32", "bf16"), "cpu": ("fp32", "bf16")}
MIN_REPS = 20
MIN_TICKS = 50  # clock ticks of CPU capacity below which the others' share is too coarse to report
QUIET_SAMPLE_S = 0.3


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="smaller grid: batch 128 and 8192 (CUDA) or 1024 (CPU), hidden 128; fewer repetitions")
    p.add_argument("--out", type=Path, help="results folder (default bench/results/<device-name-slug>/)")
    p.add_argument("--cases", nargs="+", choices=cases.CASES, default=list(cases.CASES))
    p.add_argument("--impls", nargs="+", default=["*"], metavar="PATTERN", help="implementations to run (globs)")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="implementations to leave out")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes (default: the grid's)")
    p.add_argument("--hidden", nargs="+", type=int, help="hidden widths (default: the grid's)")
    p.add_argument("--dtypes", nargs="+", choices=tuple(cases.DTYPES), help="default: fp32 tf32 bf16 (CPU: no tf32)")
    p.add_argument("--momentum", nargs="+", type=float, help="SGD momentum of optimizer and train_step (0 0.9)")
    p.add_argument("--in-features", type=int, default=784)
    p.add_argument("--out-features", type=int, default=10)
    p.add_argument("--bias", action="store_true", help="Linear layers with bias (the seed has none)")
    p.add_argument("--reps", type=int, help="CPU: timed calls per implementation and config (200; full 400)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (CPU 5; CUDA 3, full 5)")
    p.add_argument("--budget-s", type=float, help="CPU: seconds of timed calls per implementation (2; full 5)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads for the run (default: torch's choice)")
    p.add_argument("--max-others", type=float, default=0.1,
                   help="CPU: time a config again when other processes took more than this share of the CPUs")
    p.add_argument("--retries", type=int, default=3, help="CPU: at most this many re-timings per config")
    p.add_argument("--pause-s", type=float, default=10.0, help="CPU: pause before re-timing a config")
    p.add_argument("--merge", action="store_true", help="keep the folder's rows for points not measured again")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md and the plots from results.csv")
    p.add_argument("--list", action="store_true", help="print the implementations listed for the device, then exit")
    args = p.parse_args(argv)
    grid = QUICK[args.device] if args.quick else FULL
    args.batch = args.batch or list(grid["batch"])
    args.hidden = args.hidden or list(grid["hidden"])
    args.momentum = args.momentum if args.momentum is not None else list(grid["momentum"])
    args.dtypes = args.dtypes or list(DTYPES[args.device])
    args.reps = args.reps or (200 if args.quick else 400)
    args.rounds = args.rounds or (5 if args.device == "cpu" or not args.quick else 3)
    args.budget_s = args.budget_s or (2.0 if args.quick else 5.0)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cpu" and "tf32" in args.dtypes:
        p.error("--dtypes tf32 needs --device cuda (TF32 is a CUDA tensor-core format)")
    for name, values in (("--batch", args.batch), ("--hidden", args.hidden), ("--reps", [args.reps]),
                         ("--rounds", [args.rounds]), ("--in-features", [args.in_features]),
                         ("--out-features", [args.out_features])):
        if min(values) < 1:
            p.error(f"{name} must be positive, got {values}")
    return args


def selected(impl: cases.Impl, args: argparse.Namespace) -> bool:
    return any(fnmatch.fnmatchcase(impl.name, p) for p in args.impls) and \
        not any(fnmatch.fnmatchcase(impl.name, p) for p in args.exclude)


def listed(case: str, device: str, args: argparse.Namespace, log=print) -> list[cases.Impl]:
    """The selected implementations that run ``case`` on ``device``; the unavailable ones are logged."""
    out = []
    for impl in cases.IMPLS:
        if not selected(impl, args):
            continue
        why = impl.unavailable(case, device)
        if why is None:
            out.append(impl)
        elif not why.startswith(("does not apply", "needs ")):
            log(f"note: {impl.name} skipped for {case}: {why}")
    return out


def configs(args: argparse.Namespace):
    for dtype in args.dtypes:
        for hidden in args.hidden:
            for batch in args.batch:
                for case in args.cases:
                    for momentum in (args.momentum if case in cases.OPTIMIZER_CASES else [None]):
                        yield cases.Config(case, batch, args.in_features, hidden, args.out_features, dtype,
                                           momentum, args.bias)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(works: dict, args) -> dict:
    """Per-call seconds of each work, interleaved in rounds (see the module docstring)."""
    counts = {}
    for name, work in works.items():
        one = []
        for _ in range(3):
            start = time.perf_counter()
            work()
            one.append(time.perf_counter() - start)
        counts[name] = min(args.reps, max(MIN_REPS, int(args.budget_s / max(min(one), 1e-9))))
    times = {name: [] for name in works}
    names = list(works)
    gc.disable()
    try:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                work, per_round = works[name], math.ceil(counts[name] / args.rounds)
                for _ in range(per_round):
                    start = time.perf_counter()
                    work()
                    times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


def _jiffies() -> tuple[int, int] | None:
    """(busy clock ticks of the whole machine, of this process) from /proc; None where there is no /proc."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return sum(ticks) - ticks[3] - ticks[4], int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def _while_others(fn):
    """(fn(), share of the machine's CPU time that other processes and the hypervisor took meanwhile); the
    share is None where there is no /proc or the call was too short to tell (under ``MIN_TICKS`` ticks)."""
    before, start = _jiffies(), time.perf_counter()
    result = fn()
    after, wall = _jiffies(), time.perf_counter() - start
    capacity = wall * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
    if not (before and after) or capacity < MIN_TICKS:
        return result, None
    return result, min(1.0, max(0.0, ((after[0] - before[0]) - (after[1] - before[1])) / capacity))


def time_cpu_quietly(works: dict, args, log=print) -> tuple[dict, float | None]:
    """:func:`time_cpu` on a quiet machine, and the others' share of the CPUs while it ran (see
    :func:`_while_others`; for a timing too short to tell, the share just before it). With ``--retries`` > 0, first waits (``--pause-s`` at a time, at most ``--retries``
    times) until others take at most ``--max-others`` of the CPUs over ``QUIET_SAMPLE_S``, and times again
    when they took more during the timing; keeps the attempt with the smallest share."""
    best, before = None, None
    for attempt in range(args.retries + 1):
        last = attempt == args.retries
        if args.retries:
            _, before = _while_others(lambda: time.sleep(QUIET_SAMPLE_S))
            if before is not None and before > args.max_others and not last:
                log(f"  other processes are using {100 * before:.0f}% of the CPUs; waiting {args.pause_s:g} s")
                time.sleep(args.pause_s)
                continue
        times, others = _while_others(lambda: time_cpu(works, args))
        others = before if others is None else others
        if best is None or (others is not None and (best[1] is None or others < best[1])):
            best = (times, others)
        if others is None or others <= args.max_others or last:
            break
        log(f"  other processes took {100 * others:.0f}% of the CPUs while timing; again in {args.pause_s:g} s")
        time.sleep(args.pause_s)
    return best


def time_cuda(works: dict, args) -> dict:
    from triton.testing import do_bench

    times = {name: [] for name in works}
    names = list(works)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name] += [ms * 1e-3 for ms in do_bench(works[name], warmup=25, rep=100, return_mode="all")]
    return times


def measure(cfg: cases.Config, impls: list[cases.Impl], device: torch.device, args, peak, log=print) -> list[dict]:
    """Rows (without the stamp) for ``cfg``: build, warm up, check, then time the implementations together."""
    if any(i.name.startswith("compile") for i in impls):
        torch._dynamo.reset()
    rows, works, setup = {}, {}, {}
    with cases.precision(cfg.dtype):
        inputs = cases.make_inputs(cfg, device)
        ref = cases.reference(cfg, inputs)
        for impl in impls:
            try:
                start = time.perf_counter()
                runner = impl.make(cfg, inputs)
                for _ in range(cases.WARMUP_CALLS):
                    runner.work()
                _sync(device)
                setup[impl.name] = time.perf_counter() - start
                runner.reset(inputs)
                problem = cases.mismatch(cfg, cases.snapshot(runner), ref)
            except Exception as error:  # a failing implementation is a row with its error, never a crash
                problem = f"error: {type(error).__name__}: {' '.join(str(error).split())[:300]}"
            if problem:
                log(f"  {impl.name}: {problem}")
                rows[impl.name] = {"status": problem if problem.startswith("error") else f"mismatch: {problem}"}
            else:
                works[impl.name] = runner.work
        others = None
        if works and device.type == "cuda":
            times = time_cuda(works, args)
        elif works:
            times, others = time_cpu_quietly(works, args, log)
        else:
            times = {}
    elem = torch.finfo(cases.DTYPES[cfg.dtype]).bits // 8
    flops, nbytes = roofline.work(cfg.case, cfg.batch, cfg.n_in, cfg.hidden, cfg.n_out, cfg.bias, elem, cfg.momentum)
    bound = peak.bound_s(flops, nbytes, cfg.dtype) if peak else None
    medians = {name: report.median_us(t) for name, t in times.items()}
    out = []
    for impl in impls:
        row = {"case": cfg.case, "impl": impl.name, "batch": cfg.batch, "n_in": cfg.n_in, "hidden": cfg.hidden,
               "n_out": cfg.n_out, "bias": cfg.bias, "dtype": cfg.dtype,
               "momentum": "" if cfg.momentum is None else cfg.momentum, "gflop": f"{flops / 1e9:.4g}",
               "mbytes": f"{nbytes / 1e6:.4g}", "median_us": "", "speedup_vs_eager": "", "roofline_us": "",
               "roofline_frac": "", "reps": "", "setup_s": "", "status": "ok",
               "others_cpu": "" if others is None else f"{others:.3f}"}
        row.update(rows.get(impl.name, {}))
        if impl.name in setup:
            row["setup_s"] = f"{setup[impl.name]:.2f}"
        if impl.name in medians:
            median = medians[impl.name]
            row.update(median_us=f"{median:.3f}", reps=len(times[impl.name]),
                       roofline_us=f"{bound * 1e6:.3f}" if bound else "n/a",
                       roofline_frac=f"{bound * 1e6 / median:.4f}" if bound else "n/a")
            if "eager" in medians:
                row["speedup_vs_eager"] = f"{medians['eager'] / median:.3f}"
        out.append({k: str(v) for k, v in row.items()})
    return out


def pyfused_backend(device: torch.device) -> str:
    """``PYFUSED_BACKEND`` and the path it picks on ``device``; refuses Triton's interpreter, which is not a
    performance path."""
    from pyfused import backend

    kernels = backend.use_triton(device, torch.float32)
    if kernels and device.type == "cpu":
        raise SystemExit("PYFUSED_BACKEND=triton on CPU runs Triton's interpreter, which is not a performance "
                         "path: benchmark the CPU with PYFUSED_BACKEND=auto or torch")
    return f"{backend.requested()} → {'Triton kernels' if kernels else 'pure-torch path'}"


def write_reports(folder: Path, rows: list[dict]) -> None:
    order = [i.name for i in cases.IMPLS]
    report.write_markdown(folder / report.MD_NAME, rows, order, cases.PYFUSED_IMPLS)
    report.write_plots(folder, rows, order)


def main(argv: list[str] | None = None, log=print) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = args.out or Path(__file__).resolve().parent / "results" / report.slug(report.device_name(device))
    if args.list:
        for case in args.cases:
            log(f"{case}: " + ", ".join(i.name for i in listed(case, args.device, args, log)))
        return 0
    csv_path = folder / report.CSV_NAME
    if args.report_only:
        write_reports(folder, report.read_csv(csv_path))
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    stamp = report.stamp(device, argv, pyfused_backend(device))
    peak = roofline.peak_for(stamp["device"]) if device.type == "cuda" else None
    kept = report.read_csv(csv_path) if args.merge and csv_path.exists() else []
    new = []
    log(f"{stamp['device']}, torch {stamp['torch']}, triton {stamp['triton']}, threads {stamp['threads']} → {folder}")
    for cfg in configs(args):
        impls = listed(cfg.case, args.device, args, log=lambda *_: None)
        if not impls:
            continue
        log(f"{cfg.case} B={cfg.batch} hidden={cfg.hidden} {cfg.dtype} momentum={cfg.momentum}")
        rows = [dict(row, **stamp) for row in measure(cfg, impls, device, args, peak, log)]
        for row in rows:
            log(f"  {row['impl']:<24} {row['median_us'] or '-':>12} µs  ×{row['speedup_vs_eager'] or '-':<7} "
                f"setup {row['setup_s'] or '-'} s  {row['status'] if row['status'] != 'ok' else ''}")
        new += rows
        measured = {report.key(r) for r in new}
        report.write_csv(csv_path, [r for r in kept if report.key(r) not in measured] + new)
    rows = report.read_csv(csv_path)
    write_reports(folder, rows)
    log(f"wrote {csv_path}, {folder / report.MD_NAME} and the speed-up plots")
    return 0 if all(_acceptable(r) for r in new) else 1


def _acceptable(row: dict) -> bool:
    """Whether a row lets the run succeed: every pyfused row must be ok; a PyTorch baseline that the gate finds
    wrong is reported (its status says why, and it gets no time) but is PyTorch's problem, not the run's — e.g.
    torch 2.11's CPU ``SGD(fused=True)`` rounds bfloat16 updates 15× worse than its for-loop (max error 7.3e-3
    against 4.9e-4 after one step). A baseline that errors still fails the run."""
    if row["status"] == "ok":
        return True
    return row["impl"] not in cases.PYFUSED_IMPLS and row["status"].startswith("mismatch")
