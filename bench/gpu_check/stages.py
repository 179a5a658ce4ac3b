"""Stages 1 and 3–6 of ``python -m bench.gpu_check``: environment, launches, seed job, timings, registers."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

import pyfused
from bench.gpu_check.common import DTYPES, ROOT, SEED, copy_model, kernel_backend, with_precision
from bench.gpu_check.correctness import Variant, batches
from bench.gpu_check.report import Report, nvidia_smi, table

TIMING_BATCHES = (128, 4096, 16384, 65536)
TIMING_DTYPES = ("fp32", "tf32", "bf16")
WIDE = dict(batches=(128,), dims=(784, 1024, 10))  # timed too: the row kernel's hidden split (8 groups on an H200)
SEED_STEP_IMPLS = ("eager", "compile_default", "compile_reduce_overhead", "eager_cudagraph", "pyfused",
                   "fused_train_step", "fused_train_step_cudagraph")

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
        smi = nvidia_smi("driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,"
                          "temperature.gpu,persistence_mode")
        names = ("driver", "SM clock (MHz)", "max SM clock (MHz)", "memory clock (MHz)", "max memory clock (MHz)",
                 "power limit (W)", "temperature (C)", "persistence mode")
        facts.update(dict(zip(names, smi)) if smi else {"nvidia-smi": "not readable"})
    else:
        facts["CPU"] = report.stamp["device"]
        facts["threads"] = torch.get_num_threads()
    lines = table(["fact", "value"], [[k, v] for k, v in facts.items()])
    report.rows("environment", [{"fact": k, "value": v} for k, v in facts.items()])
    report.set("environment", "pass", report.stamp["device"], lines)


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
    x, t = next(batches(v, device, 1))
    lines, rows, problems = [], [], []
    with kernel_backend(cuda):
        torch.manual_seed(0)
        model = pyfused.FusedMLP(n_in, hidden, out, bias=False).to(device)
        step = pyfused.FusedTrainStep(model, pyfused.FusedSGD(model.parameters(), lr=0.15, momentum=0.9))
        module = copy_model(model)
        opt = pyfused.FusedSGD(module.parameters(), lr=0.15, momentum=0.9)

        def module_step():
            module.nll_loss(x, t).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        deep = pyfused.DeepFusedMLP(n_in, hidden, hidden, out, log_softmax=False).to(device)
        deep_step = pyfused.FusedTrainStep(deep, pyfused.FusedAdam(deep.parameters()), loss="mse")
        values = torch.randn(x.shape[0], out, device=device)
        accumulating = copy_model(deep)
        acc_step = pyfused.FusedTrainStep(accumulating, pyfused.FusedAdam(accumulating.parameters()),
                                          accumulation_steps=2, loss="cross_entropy")
        work = {"FusedTrainStep call": (lambda: step(x, t), 2),
                "module step (FusedMLP.nll_loss, backward, FusedSGD)": (module_step, 4),
                "FusedTrainStep call, three layers, Adam, MSE": (lambda: deep_step(x, values), 2),
                "FusedTrainStep, accumulation_steps=2, Adam: two calls (one update)":
                    (lambda: (acc_step(x, t), acc_step(x, t)), 5)}
        for name, (fn, expected) in work.items():
            per_call, kernels = _count_launches(fn)
            row = dict(what=name, pyfused_launches=per_call, kernels=" ".join(kernels))
            if cuda:
                profiled, names = _profiled_kernels(fn, device)
                row.update(cuda_kernels=profiled, cuda_kernel_names=" ".join(n[:40] for n in names))
            rows.append(row)
            if per_call != expected:
                problems.append(f"{name}: {per_call:g} launches, not {expected}")
        if cuda:
            eager_model, graph_model = copy_model(model), copy_model(model)
            opts = dict(lr=0.15, momentum=0.9)
            eager_step = pyfused.FusedTrainStep(eager_model, pyfused.FusedSGD(eager_model.parameters(), **opts))
            graph_step = pyfused.FusedTrainStep(graph_model, pyfused.FusedSGD(graph_model.parameters(), **opts))
            graph_step.capture(x, t)
            data = list(batches(v, device, 5, seed=9))
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
    lines += table(header, [[r["what"], r["pyfused_launches"], r["kernels"]]
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
    lines = [f"`{command}`", "", *table(
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
    from bench import model as perf_model
    from bench import roofline
    from bench.cases import precision

    peak = roofline.peak_for(report.stamp["device"]) if device.type == "cuda" else None
    predicted = perf_model.committed(report.stamp["device"])  # {} but on the GPUs the model was run for
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
                module = copy_model(model)
                opt = pyfused.FusedSGD(module.parameters(), lr=1e-4, momentum=0.9)

                def module_step():
                    module.nll_loss(x, t).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=False)

                # bench.model's prediction (784 → hidden → 10 with bias; here without): launch 1, launch 2, step
                guess = predicted.get((batch, hidden, dtype_name)) if (n_in, out) == (
                    perf_model.N_IN, perf_model.N_OUT) else None
                for what, fn in (("FusedTrainStep", lambda: step(x, t)), ("module step", module_step)):
                    fn()
                    launched = []
                    with observe(launched.append):
                        fn()
                    for i, one in enumerate(launched):
                        row = dict(what=f"{what} launch {i + 1}: {one.name}", batch=batch, hidden=hidden,
                                   dtype=dtype_name, grid=one.grid[0], median_us=f"{_do_bench(one.again):.2f}")
                        if guess and what == "FusedTrainStep" and i < 2:
                            row.update(_versus(float(row["median_us"]), guess[i]))
                        rows.append(row)
                    step_us = _do_bench(fn)
                    elem = torch.finfo(dtype).bits // 8
                    flops, nbytes = roofline.work("train_step", batch, n_in, hidden, out, False, elem, 0.9)
                    bound = peak.bound_s(flops, nbytes, dtype_name) * 1e6 if peak else None
                    rows.append(dict(what=f"{what} (whole call)", batch=batch, hidden=hidden, dtype=dtype_name, grid="",
                                     median_us=f"{step_us:.2f}", roofline_us=f"{bound:.2f}" if bound else "n/a",
                                     x_roofline=f"{step_us / bound:.1f}" if bound else "n/a",
                                     **(_versus(step_us, guess[2]) if guess and what == "FusedTrainStep" else {})))
                if device.type == "cuda":
                    step.capture(x, t)
                    captured = _do_bench(lambda: step(x, t))
                    rows.append(dict(what="FusedTrainStep captured (whole call)", batch=batch, hidden=hidden,
                                     dtype=dtype_name, grid="", median_us=f"{captured:.2f}",
                                     roofline_us=f"{bound:.2f}" if bound else "n/a",
                                     x_roofline=f"{captured / bound:.1f}" if bound else "n/a"))
    return rows


def _course_step(shape, loss: str, optimizer: str, batch: int, dtype, device):
    """A course program's FusedTrainStep as tests/test_course.py builds it, and one batch: NLL on a log_softmax
    FusedMLP without bias (the fashion-MNIST fit); MSE (sum) on a logits one; the small net's DeepFusedMLP (relu
    then sigmoid, bias on the output only) with cross-entropy; FusedSGD with momentum or FusedAdam."""
    _, n_in, hidden, out, extra = shape
    torch.manual_seed(0)
    if extra:
        model = pyfused.DeepFusedMLP(n_in, hidden, *extra, out, activation=("relu", "sigmoid"),
                                     bias=(False,) * (1 + len(extra)) + (True,), log_softmax=False)
        kind = dict(loss="cross_entropy")
    elif loss == "mse":
        model, kind = pyfused.FusedMLP(n_in, hidden, out, log_softmax=False), dict(loss="mse", reduction="sum")
    else:
        model, kind = pyfused.FusedMLP(n_in, hidden, out, bias=False), {}
    model = model.to(device, dtype)
    opt = (pyfused.FusedAdam(model.parameters(), lr=1e-4) if optimizer == "adam"
           else pyfused.FusedSGD(model.parameters(), lr=1e-4, momentum=0.9))
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, n_in, device=device, generator=g).to(dtype)
    t = (torch.randn(batch, out, device=device, generator=g).to(dtype) if loss == "mse"
         else torch.randint(0, out, (batch,), device=device, generator=g))
    return pyfused.FusedTrainStep(model, opt, **kind), x, t


def course_points(shapes=None, large=None, modes=TIMING_DTYPES) -> list[tuple]:
    """``(program, loss, optimizer, shape, batch, mode)`` of each course step to time: bench.model's
    COURSE_STEPS (the regression with SGD and with Adam) at the program's own batch and at ``large`` rows
    (COURSE_LARGE_ROWS), each mode. ``shapes``: {program: (rows, in, hidden, out, extra hidden)} instead of
    bench.gpu_compile.COURSE's (tests: tiny sizes)."""
    sys.path.insert(0, str(ROOT))
    from bench import gpu_compile
    from bench.model import COURSE_STEPS

    shapes = shapes or {name: shape for name, (shape, _) in gpu_compile.COURSE.items()}
    large = large or gpu_compile.COURSE_LARGE_ROWS
    return [(program, loss, optimizer, shapes[program], batch, mode)
            for program, _, _, loss, optimizer in COURSE_STEPS
            for batch in dict.fromkeys((shapes[program][0], large)) for mode in modes]


def time_course(report: Report, device: torch.device, points: list[tuple]) -> list[dict]:
    """FusedTrainStep's whole call at each of :func:`course_points`, eager and captured, beside the roofline
    (:func:`bench.model.work_roofline` for the program's widths, loss and optimizer) and bench.model's committed
    course prediction."""
    sys.path.insert(0, str(ROOT))
    from bench import model as perf_model
    from bench import roofline
    from bench.cases import precision

    peak = roofline.peak_for(report.stamp["device"]) if device.type == "cuda" else None
    predicted = perf_model.committed_course(report.stamp["device"])  # {} but on the GPUs the model was run for
    rows = []
    for program, loss, optimizer, shape, batch, mode in points:
        if report.out_of_time(reserve_s=0.2 * report.budget_s):
            break
        with precision(mode):
            step, x, t = _course_step(shape, loss, optimizer, batch, DTYPES[mode], device)
            step(x, t)
            us = _do_bench(lambda: step(x, t))
            row = dict(program=program, optimizer=optimizer, batch=batch, dtype=mode, median_us=f"{us:.2f}")
            if device.type == "cuda":
                step.capture(x, t)
                row["captured_us"] = f"{_do_bench(lambda: step(x, t)):.2f}"
            if peak:
                bound = perf_model.work_roofline(batch, shape[2], mode, peak, n_in=shape[1], n_out=shape[3],
                                                 extra_hidden=shape[4], loss=loss, optimizer=optimizer)
                row.update(roofline_us=f"{bound:.2f}", x_roofline=f"{us / bound:.1f}")
            guess = predicted.get((program, optimizer, batch, mode))
            if guess:
                row.update(_versus(us, guess))
            rows.append(row)
    return rows


def _versus(measured_us: float, predicted_us: float) -> dict:
    """The model's prediction beside a measurement: predicted µs and measured / predicted."""
    return dict(predicted_us=f"{predicted_us:.2f}", measured_over_predicted=f"{measured_us / predicted_us:.2f}")


def stage_timings(report: Report, device: torch.device, **sizes) -> None:
    lines, status = [], "pass"
    seed_rows = time_seed_step(report, device, **sizes.get("seed", {}))
    report.rows("timings_seed_step", seed_rows)
    lines += ["Seed step (B = 128, 784 → 128 → 10, fp32 IEEE, no bias, SGD momentum 0), `do_bench` medians:", ""]
    lines += table(["implementation", "median µs", "× eager", "setup s", "status"],
                    [[r["impl"], r["median_us"], r["speedup_vs_eager"], r["setup_s"], r["status"]] for r in seed_rows])
    if any(r["status"] != "ok" and r["impl"].startswith(("pyfused", "fused")) for r in seed_rows):
        status = "fail"
    report.set("timings", "running", "seed step timed", lines)
    sweeps = [sizes.get("launches", {}), sizes.get("wide", WIDE)]
    launch_rows = [r for sweep in sweeps for r in time_launches(report, device, **sweep)]
    report.rows("timings_launches", launch_rows)
    lines += ["", "Each pyfused launch alone and the whole step (784 → hidden → 10, no bias, momentum 0.9), "
              "`do_bench` medians; roofline = max(compulsory bytes / HBM bandwidth, FLOPs / dense peak) "
              "(bench/roofline.py); predicted = bench/results/model/<gpu>.md (with bias), and measured / predicted, "
              "the model's error:",
              ""]
    lines += table(["what", "B", "hidden", "dtype", "grid", "median µs", "roofline µs", "× roofline",
                    "predicted µs", "measured / predicted"],
                    [[r["what"], r["batch"], r["hidden"], r["dtype"], r["grid"], r["median_us"],
                      r.get("roofline_us", ""),
                      r.get("x_roofline", ""), r.get("predicted_us", ""), r.get("measured_over_predicted", "")]
                     for r in launch_rows])
    expected = sum(len(sweep.get("batches", TIMING_BATCHES)) * len(sweep.get("dtypes", TIMING_DTYPES))
                   for sweep in sweeps)
    done = len({(r["batch"], r["hidden"], r["dtype"]) for r in launch_rows})
    if done < expected and status == "pass":
        status = "cut short (budget)"
    points = course_points(**sizes.get("course", {}))
    course_rows = time_course(report, device, points)
    report.rows("timings_course", course_rows)
    lines += ["", "The course's programs (bench.model's course table: bias as each program has it here, on every "
              "layer there), FusedTrainStep's whole call, `do_bench` medians, eager and captured:", ""]
    lines += table(["program", "optimizer", "B", "dtype", "median µs", "captured µs", "roofline µs", "× roofline",
                    "predicted µs", "measured / predicted"],
                   [[r["program"], r["optimizer"], r["batch"], r["dtype"], r["median_us"], r.get("captured_us", ""),
                     r.get("roofline_us", ""), r.get("x_roofline", ""), r.get("predicted_us", ""),
                     r.get("measured_over_predicted", "")] for r in course_rows])
    if len(course_rows) < len(points) and status == "pass":
        status = "cut short (budget)"
    from bench.gpu_check.choices import CHOICES, time_choices

    choices = sizes.get("choices", CHOICES)
    choice_rows = time_choices(report, device, choices)
    report.rows("timings_choices", choice_rows)
    lines += ["", "Launch configurations chosen from bench.model without a GPU (bench/gpu_check/choices.py): the "
              "launcher's tiles against those they replaced, the launch alone, outputs compared first, `do_bench` "
              "medians; predicted = bench.model's µs, earlier → launcher:", ""]
    lines += table(["what", "B", "dtype", "status", "launcher µs", "earlier µs", "earlier / launcher", "predicted"],
                   [[r["what"], r["batch"], r["dtype"], r["status"], r["launcher_us"], r["earlier_us"],
                     r["earlier_over_launcher"], r.get("predicted", "")] for r in choice_rows])
    if any(r["status"] != "ok" for r in choice_rows):
        status = "fail"
    elif len(choice_rows) < len(choices) and status == "pass":
        status = "cut short (budget)"
    best = next((r for r in seed_rows if r["impl"] == "fused_train_step_cudagraph" and r["median_us"]), None) or \
        next((r for r in seed_rows if r["impl"] == "fused_train_step" and r["median_us"]), None)
    summary = f"seed step {best['impl']} {best['median_us']} µs ({best['speedup_vs_eager']}× eager)" if best else \
        "no pyfused seed-step time"
    report.set("timings", status, summary + f"; {done}/{expected} (B, hidden, dtype) points of the sweep, "
               f"{len(course_rows)}/{len(points)} course steps, {len(choice_rows)}/{len(choices)} config choices",
               lines)


# ----------------------------------------------------------------------------------------------- 6. registers
def committed_report_path(arch: str) -> Path:
    """The committed compile report of ``arch`` made with this Triton's minor version
    (``bench/results/compile/triton-<major.minor>/<arch>.md``, e.g. the GPU machine's 3.6) where there is one, else
    the development stack's ``bench/results/compile/<arch>.md``."""
    import triton

    folder = ROOT / "bench" / "results" / "compile"
    same = folder / f"triton-{'.'.join(triton.__version__.split('.')[:2])}" / f"{arch}.md"
    return same if same.exists() else folder / f"{arch}.md"


def committed_report(arch: str) -> dict:
    """(kernel label, mode, bias) → (regs, spill text) from the committed report's seed-shape table
    (:func:`committed_report_path`)."""
    from bench.compile_report import table_rows

    path = committed_report_path(arch)
    if not path.exists():
        return {}
    seed = table_rows(path.read_text(encoding="utf-8"))[0]
    return {(r["kernel"], r["mode"], r["bias"]): (r["regs"], r["spill"].replace("*", "")) for r in seed}


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
            with with_precision(case.mode), observe(seen.append):
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
             f"the committed `{committed_report_path(arch).relative_to(ROOT)}` (bundled ptxas). Spills are bytes "
             "reported by the "
             "driver's compile.", ""]
    lines += table(["kernel", "mode", "regs (driver)", "spills (driver)", "regs (committed)", "spill (committed)",
                     "same regs"], [[r[k] for k in ("kernel", "mode", "driver_regs", "driver_spills", "committed_regs",
                                                    "committed_spill", "same_regs")] for r in rows])
    same = sum(r["same_regs"] == "yes" for r in rows)
    report.set("registers", "fail" if spilled else "pass",
               (f"spills in {', '.join(spilled)}; " if spilled else "no spills; ")
               + f"{same}/{len(rows)} register counts as committed", lines)


