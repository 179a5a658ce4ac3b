"""Benchmark outputs: the stamp of a run, and the CSV, markdown and PNG writers.

Every CSV row carries its stamp (device, versions, threads, pyfused backend, date, command), so rows from runs
merged into one folder stay attributable; the markdown and the plots list the stamps of the rows they show.
Values are stored as text: numbers formatted once here, empty where nothing was measured, ``n/a`` for a
roofline the device has no peak for.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import shlex
import statistics
from pathlib import Path

import torch

COLUMNS = ("case", "impl", "batch", "n_in", "hidden", "n_out", "bias", "dtype", "momentum", "median_us",
           "speedup_vs_eager", "roofline_frac", "roofline_us", "gflop", "mbytes", "reps", "setup_s", "others_cpu",
           "status", "device", "torch", "triton", "threads", "pyfused_backend", "date", "command")
KEY = ("case", "impl", "batch", "n_in", "hidden", "n_out", "bias", "dtype", "momentum")
STAMP = ("device", "torch", "triton", "threads", "pyfused_backend", "date", "command")
CASE_ORDER = ("train_step", "forward", "fwd_bwd", "loss", "optimizer")
DTYPE_ORDER = ("fp32", "tf32", "bf16")
CSV_NAME, MD_NAME = "results.csv", "results.md"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (the platform's processor string elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` → ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


def stamp(device: torch.device, argv: list[str], pyfused_backend: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device_name(device), "torch": torch.__version__, "triton": triton_version,
        "threads": f"{torch.get_num_threads()} (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})",
        "pyfused_backend": pyfused_backend,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench " + shlex.join(argv),
    }


def key(row: dict) -> tuple:
    return tuple(row[k] for k in KEY)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows: list[dict]) -> None:
    """All rows, written to a temporary file then renamed, so an interrupted run never leaves half a file."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _num(text: str) -> float | None:
    return float(text) if text not in ("", "n/a") else None


def _dtype_rank(dtype: str) -> int:
    return DTYPE_ORDER.index(dtype) if dtype in DTYPE_ORDER else len(DTYPE_ORDER)


def _sort_key(row: dict, impl_order: list[str]):
    momentum = _num(row["momentum"])
    return (int(row["hidden"]), _dtype_rank(row["dtype"]), -1 if momentum is None else momentum, int(row["batch"]),
            impl_order.index(row["impl"]) if row["impl"] in impl_order else len(impl_order), row["impl"])


def _fmt_row(row: dict) -> str:
    median, speedup, roof = _num(row["median_us"]), _num(row["speedup_vs_eager"]), _num(row["roofline_frac"])
    cells = [row["batch"], row["hidden"], row["dtype"], row["momentum"] or "-", f"`{row['impl']}`",
             f"{median:,.1f}" if median is not None else "-", f"{speedup:.2f}×" if speedup is not None else "-",
             f"{100 * roof:.1f}%" if roof is not None else "n/a", row["setup_s"] or "-", row["reps"] or "-",
             f"{100 * float(row['others_cpu']):.0f}%" if row["others_cpu"] else "-", row["status"]]
    return "| " + " | ".join(cells) + " |"


def _stamps(rows: list[dict]) -> list[str]:
    seen = {}
    for row in rows:
        seen.setdefault(tuple(row[k] for k in STAMP), None)
    return [f"- {s[5]}: `{s[6]}` — {s[0]}, torch {s[1]}, triton {s[2]}, threads {s[3]}, pyfused backend: {s[4]}"
            for s in seen]


def _best(rows, **where):
    picked = [r for r in rows if all(r[k] == v for k, v in where.items()) and _num(r["median_us"]) is not None]
    return min(picked, key=lambda r: float(r["median_us"])) if picked else None


def _targets(rows: list[dict], pyfused_impls: tuple) -> list[str]:
    """The issue's targets, read off the measured rows (nothing is written for what was not measured)."""
    lines = ["## Targets", "",
             "Seed training step (train_step, B=128, 784→128→10): ≥10× eager and ≥2× torch.compile "
             "reduce-overhead on GPU; on CPU the project aims at ≥1.5× eager. Large batches: ≥75% of roofline.", ""]
    seed_shape = ("128", "784", "128", "10")
    seeds = sorted({(r["dtype"], r["momentum"], r["bias"]) for r in rows
                    if r["case"] == "train_step" and (r["batch"], r["n_in"], r["hidden"], r["n_out"]) == seed_shape},
                   key=lambda s: (_dtype_rank(s[0]), s[1], s[2]))
    for dtype, momentum, bias in seeds:
        where = dict(case="train_step", batch="128", n_in="784", hidden="128", n_out="10", dtype=dtype,
                     momentum=momentum, bias=bias)
        best = min((r for r in (_best(rows, impl=i, **where) for i in pyfused_impls) if r),
                   key=lambda r: float(r["median_us"]), default=None)
        if best is None:
            lines.append(f"- seed step {dtype}, momentum {momentum}, bias {bias}: no pyfused row measured")
            continue
        ours = float(best["median_us"])
        parts = [f"- seed step {dtype}, momentum {momentum}, bias {bias}: best pyfused `{best['impl']}` "
                 f"{ours:,.1f} µs"]
        for other in ("eager", "compile_reduce_overhead", "compile_default"):
            theirs = _best(rows, impl=other, **where)
            if theirs is not None:
                parts.append(f"{float(theirs['median_us']) / ours:.2f}× vs `{other}`")
        lines.append(", ".join(parts))
    batches = [int(r["batch"]) for r in rows if r["case"] == "train_step"]
    if batches:
        top = str(max(batches))
        fracs = [r for r in rows if r["case"] == "train_step" and r["batch"] == top and r["impl"] in pyfused_impls
                 and _num(r["roofline_frac"]) is not None]
        if fracs:
            best = max(fracs, key=lambda r: float(r["roofline_frac"]))
            lines.append(f"- largest batch measured (B={top}): best pyfused train_step roofline fraction "
                         f"{100 * float(best['roofline_frac']):.1f}% (`{best['impl']}`, hidden {best['hidden']}, "
                         f"{best['dtype']})")
        else:
            lines.append(f"- largest batch measured (B={top}): roofline n/a on this device (no datasheet peak)")
    return lines + [""]


def write_markdown(path: Path, rows: list[dict], impl_order: list[str], pyfused_impls: tuple) -> None:
    device = rows[0]["device"] if rows else "?"
    lines = [f"# pyfused benchmarks — {device}", "", "Runs (date, command, conditions):", *_stamps(rows), "",
             "Median per call: CUDA — `triton.testing.do_bench` per-call times (L2 flushed before each call); "
             "CPU — `time.perf_counter` around each call, implementations interleaved in rounds. Before timing, "
             "each implementation's outputs and updated parameters were checked against eager PyTorch "
             "(bench/cases.py states the tolerances); a row that failed shows why and no time. `setup s` = "
             "build + 3 warm-up calls (compilation, autotuning, Triton JIT, CUDA-graph capture), excluded from "
             "the median. `others' CPU` (CPU runs) = share of the machine's CPU time that other processes took "
             "while the row was timed (re-timed when above `--max-others`). Roofline = max(compulsory bytes / HBM "
             "bandwidth, FLOPs / dense peak) ÷ median, datasheet peaks in bench/roofline.py; n/a where the device "
             "has none (CPUs).", ""]
    lines += _targets(rows, pyfused_impls)
    header = ("| batch | hidden | dtype | momentum | implementation | median µs | vs eager | roofline | setup s "
              "| reps | others' CPU | status |")
    for case in CASE_ORDER:
        case_rows = sorted((r for r in rows if r["case"] == case), key=lambda r: _sort_key(r, impl_order))
        if not case_rows:
            continue
        shapes = sorted({(r["n_in"], r["n_out"], r["bias"]) for r in case_rows})
        lines += [f"## {case}", "", "in → out, bias: " + "; ".join(f"{i} → {o}, {b}" for i, o, b in shapes), "",
                  header, "|" + "---|" * 12]
        lines += [_fmt_row(r) for r in case_rows] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_plots(folder: Path, rows: list[dict], impl_order: list[str]) -> list[Path]:
    """One PNG per case: speed-up vs eager against batch, a line per implementation, a panel per
    (dtype, hidden, momentum). Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    times = FuncFormatter(lambda v, _: f"{v:.3g}×")

    written = []
    for case in CASE_ORDER:
        case_rows = [r for r in rows if r["case"] == case and _num(r["speedup_vs_eager"]) is not None]
        panels = sorted({(r["dtype"], int(r["hidden"]), r["momentum"]) for r in case_rows},
                        key=lambda p: (_dtype_rank(p[0]), p[1], p[2]))
        if not panels:
            continue
        cols = min(3, len(panels))
        nrows = -(-len(panels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows + 1.2), squeeze=False)
        for ax, (dtype, hidden, momentum) in zip(axes.flat, panels):
            panel = [r for r in case_rows if (r["dtype"], int(r["hidden"]), r["momentum"]) == (dtype, hidden, momentum)]
            impls = sorted({r["impl"] for r in panel}, key=lambda i: impl_order.index(i) if i in impl_order else 99)
            for impl in impls:
                points = sorted((int(r["batch"]), float(r["speedup_vs_eager"])) for r in panel if r["impl"] == impl)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=impl)
            ax.set_xscale("log", base=2)
            speedups = [float(r["speedup_vs_eager"]) for r in panel]
            if max(speedups) > 8 * min(speedups):
                ax.set_yscale("log")
            batches = sorted({int(r["batch"]) for r in panel})
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.yaxis.set_major_formatter(times)
            ax.yaxis.set_minor_formatter(times)
            ax.axhline(1.0, color="grey", linewidth=0.8)
            ax.set_title(f"{dtype}, hidden {hidden}" + (f", momentum {momentum}" if momentum else ""), fontsize=10)
            ax.set_xlabel("batch")
            ax.set_ylabel("speed-up vs eager")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{case}: speed-up vs eager PyTorch — {case_rows[0]['device']}")
        fig.text(0.01, 0.005, "\n".join(s[2:] for s in _stamps(case_rows)), fontsize=6, va="bottom")
        fig.subplots_adjust(left=0.08, right=0.98, top=0.9 - 0.02 * nrows, bottom=0.12 + 0.03 / nrows,
                            wspace=0.3, hspace=0.45)
        out = folder / f"speedup_{case}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def median_us(times_s: list[float]) -> float:
    return statistics.median(times_s) * 1e6
