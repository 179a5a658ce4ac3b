"""Launch configurations chosen from ``bench.model`` without a GPU, timed on one side by side: each choice's launch
with the launcher's tiles and with the tiles it replaced, ``do_bench`` medians, after checking that both give the
same outputs (the test suite's rules of stage 2). Part of stage 5 of ``python -m bench.gpu_check``."""
from __future__ import annotations

import dataclasses
import math
import sys

import torch
import triton

from bench.gpu_check.common import DTYPES, ROOT
from bench.gpu_check.correctness import RULES


@dataclasses.dataclass(frozen=True)
class Choice:
    """A train-step row launch (launch 1: forward, NLL, dz and the hidden gradient, bias, relu) at ``batch`` rows of
    ``widths`` in ``mode``: the launcher's tiles (and its hidden split) against ``earlier`` (unsplit), with
    bench.model's prediction for each (µs, or None)."""

    what: str
    batch: int
    widths: tuple
    mode: str
    earlier: dict
    predicted: tuple | None = None  # (earlier, launcher)


ONE_SLICE = dict(BLOCK_M=16, BLOCK_K=32, BLOCK_H=128, BLOCK_OUT=16, num_warps=8, num_stages=2)
CHOICES = tuple(
    Choice(f"fp32 IEEE rows at {b}: two slices of 64, hidden split, vs one slice of 128", b, (784, 128, 10), "fp32",
           ONE_SLICE, (8.5, 5.6)) for b in (128, 1024))


def _row_launch(choice: Choice, device: torch.device):
    """The launch's inputs and buffers, and ``run(config, split)`` making it into them (None, None: the
    launcher's choice)."""
    from pyfused.kernels import rows as R

    n_in, hidden, n_out = choice.widths
    dtype = DTYPES[choice.mode]
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(choice.batch, n_in, device=device, generator=g).to(dtype)
    weights = [(torch.randn(o, i, device=device, generator=g) / math.sqrt(i)).to(dtype)
               for i, o in ((n_in, hidden), (hidden, n_out))]
    biases = [(torch.randn(o, device=device, generator=g) / 10).to(dtype) for o in (hidden, n_out)]
    target = torch.randint(0, n_out, (choice.batch,), device=device, generator=g)

    def run(config, split):
        blocks = (triton.cdiv(choice.batch, config["BLOCK_M"]) if config
                  else R.n_row_blocks(choice.batch, choice.widths, dtype, device=device))
        outs = dict(acts=x.new_empty(choice.batch, hidden), dpres=x.new_empty(choice.batch, hidden),
                    dz=x.new_empty(choice.batch, n_out),
                    stats=torch.empty(blocks, 2, device=device, dtype=torch.promote_types(dtype, torch.float32)))

        def launch():
            R.rows(x, weights, biases, ("relu",), loss="class", target=target, acts=[outs["acts"]],
                   dpres=[outs["dpres"]], dz=outs["dz"], stats=outs["stats"], split=split, config=config)

        launch()
        return outs, launch

    return run


def time_choices(report, device: torch.device, choices=CHOICES) -> list[dict]:
    """Each choice's two launches: outputs compared (``status``), then timed (:func:`stages._do_bench`)."""
    sys.path.insert(0, str(ROOT))
    from bench.cases import precision
    from bench.gpu_check.stages import _do_bench

    rows = []
    for choice in choices:
        if report.out_of_time(reserve_s=0.15 * report.budget_s):
            break
        with precision(choice.mode):
            run = _row_launch(choice, device)
            (ours, launch), (theirs, earlier) = run(None, None), run(choice.earlier, 1)
            same = []
            for name in ("acts", "dpres", "dz"):
                err, bound = RULES[choice.mode](ours[name].double(), theirs[name].double(), theirs[name].double())
                same.append(bool((err <= bound).all()))
            row = dict(what=choice.what, batch=choice.batch, dtype=choice.mode,
                       status="ok" if all(same) else "outputs differ",
                       launcher_us=f"{_do_bench(launch):.2f}", earlier_us=f"{_do_bench(earlier):.2f}")
            row["earlier_over_launcher"] = f"{float(row['earlier_us']) / float(row['launcher_us']):.2f}"
            if choice.predicted:
                row["predicted"] = f"{choice.predicted[0]:.1f} → {choice.predicted[1]:.1f}"
            rows.append(row)
    return rows
