"""``python -m bench.gpu_check --out DIR``: the whole verdict on a GPU in one short run.

A GPU is lent to this project a few minutes at a time, bare each time (``pip install --no-deps -e .``, then this
command). In that time, in this order, and writing ``DIR/report.md`` (and a few CSV files) after every stage, so
that a run cut short still leaves a report:

1. **environment**: GPU name, compute capability, SMs, memory, L2, driver and clocks (``nvidia-smi``), torch,
   triton, numpy, Python, the pyfused commit;
2. **correctness** on CUDA: the kernel variants (float32 IEEE, TF32, bfloat16, float16, float64; bias or none;
   relu and sigmoid; the seed shape and ragged ones) against float64 PyTorch — forward and backward of the
   fused ops (log-probabilities, logits, NLL, cross-entropy, MSE), a deeper chain, FusedSGD, FusedTrainStep with
   SGD (also captured in a CUDA graph), and with Adam on the MSE and AdamW on cross-entropy of a three-layer net
   — with the test suite's tolerances (:data:`bench.gpu_check.correctness.RULES`);
3. **launches**: kernels per FusedTrainStep call (two layers, three layers with Adam, accumulating) and per
   module-path step (counted at pyfused's launcher and, on CUDA, by torch.profiler), and that a captured step
   replays the eager result bit for bit;
4. **seed job**: ``pyfused-train --data synthetic --epochs 2 --device cuda --reference`` (loss agreement, speed);
5. **timings** (``triton.testing.do_bench`` medians, side by side, each implementation checked first by the
   benchmark's gate): the seed step at B = 128 for eager, torch.compile (default, reduce-overhead),
   CUDA-graphed eager, FusedMLP + FusedSGD, FusedTrainStep and its captured form; each pyfused launch alone at
   B = 128, 4096, 16384, 65536 (784 → 128 → 10; fp32, TF32, bf16); the step at those B against its roofline;
   each course program's FusedTrainStep (the regression with SGD and with Adam, the 20 → 13 → 8 → 3 net) at its
   own batch and at 16384 rows, eager and captured — each beside ``bench.model``'s committed prediction; and the
   launch configurations chosen from the model without a GPU against those they replaced
   (:data:`bench.gpu_check.choices.CHOICES`);
6. **registers**: what the driver's compile of each kernel of a seed step reports (registers, spills) against
   the committed compile report ``bench/results/compile/<arch>.md``.

Stages stop early when ``--budget-s`` (default 420) runs out and say so. Without CUDA, stage 2 runs the kernels
on Triton's interpreter at small shapes (float32, float16, float64: the interpreter has no bfloat16, and TF32
is a tensor-core format) and stages 4–6 are "skipped: no CUDA"; CI runs it that way.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the kernels run on Triton's interpreter: it must be on before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv=None) -> int:
    """Run the stages (see the module docstring); the exit status is 1 when a stage failed or errored."""
    import argparse
    import shlex
    import sys
    import traceback
    from pathlib import Path

    from bench.gpu_check import correctness, stages
    from bench.gpu_check.common import STAGES
    from bench.gpu_check.report import Report

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for report.md and the CSV files")
    p.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default 420)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="run only these stages")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = Report(args.out, "python -m bench.gpu_check " + shlex.join(argv), args.budget_s)
    run = dict(environment=stages.stage_environment, correctness=correctness.stage_correctness,
               launches=stages.stage_launches, seed_job=stages.stage_seed_job, timings=stages.stage_timings,
               registers=stages.stage_registers)
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
            run[name](report, device)
        except Exception as error:  # noqa: BLE001  (the report says what broke; later stages still run)
            traceback.print_exc()
            report.set(name, "error", f"{type(error).__name__}: {' '.join(str(error).split())[:200]}")
    report.write()
    print(f"[gpu_check] wrote {args.out / 'report.md'}", flush=True)
    return 1 if any(status in ("fail", "error") for status, _ in report.stages.values()) else 0
