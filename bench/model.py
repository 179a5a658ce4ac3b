"""``python -m bench.model --device h200``: a performance model of FusedTrainStep's two launches — predictions,
not measurements — for B = 128 … 65536, hidden 128 and 1024 (784 → hidden → 10, bias, SGD with momentum), in
fp32 IEEE, TF32 and bf16, with the weight-gradient reduction and the hidden layer split as the launchers split
them ("after": S slices of the rows per tile, G programs per row block) and unsplit ("before", S = G = 1);
and the course's programs (:data:`COURSE_STEPS`: their widths and depth, the MSE head, Adam) at their own batch
and at :data:`bench.gpu_compile.COURSE_LARGE_ROWS` rows, as the launchers choose. Writes
``bench/results/model/<device>.md``.

Each launch's grid and configuration are the launchers' own (:func:`bench.gpu_compile.capture`), its registers,
shared memory and resident blocks per SM those of Triton's compile for the device's architecture
(:func:`bench.gpu_compile.compile_cases`). Its time is the largest of five terms, each a floor, plus a launch:

- **math**: its FLOPs at the dtype's dense peak (:mod:`bench.roofline`), each SM doing its programs' share:
  ``× SMs · ⌈grid / SMs⌉ / grid`` (the SMs a small grid leaves idle, the tail of a last partial wave);
- **chain**: the dependent K-steps of one program (the reduction loop — with G > 1, the program's share of the
  hidden slices, then on the last one the G partials and every slice's backward —; the statistics loop of the update
  epilogue) × ``STEP_NS`` × the waves each SM runs (``grid / (SMs · blocks per SM)``, rounded up);
- **L2**: the bytes every program loads (its tiles of activations and weights, re-read by each program, less
  the columns a tile's masks leave out past the matrix's edge, and the split partials) at ``L2_TBPS`` — in
  launch 1 a program's row tile of a layer's input once per hidden slice it makes (each slice's K loop reloads
  it, and the pipelined loops' loads are ``cp.async.cg``, which bypass L1), the weights once per row block;
- **HBM**: the compulsory bytes (x once per launch, the targets in launch 1; launch 1 writes the activations, their
  gradients and dz once, launch 2 reads them; parameters and the optimizer's states — momentum, or Adam's two —
  read and written once) at the datasheet bandwidth;
- **launch**: ``LAUNCH_US`` per launch (launch latency and the tail of the last wave).

The constants are assumptions (H100/H200-class numbers from public microbenchmarks, not measured here), named so
that a GPU run can replace them; the model's error is unknown until ``python -m bench.gpu_check`` and ``python -m
bench`` have run on the device. The step's roofline is :func:`bench.roofline.work`'s ``train_step``; beside it,
:func:`two_launch_floor`, what no two-launch step can beat under the same constants (from 16384 rows it is above
1.5× the roofline at hidden 128 in TF32 and bf16, where only one launch that reads x once could come within
1.5×; at small B the two launches' own cost sets it).
"""
from __future__ import annotations

import argparse
import datetime
import math
from pathlib import Path

from bench import gpu_compile as gc
from bench.roofline import peak_for, work

STEP_NS = 120.0  # one dependent K-step of a program: pipelined L2 loads, an mma group, a barrier (assumption)
L2_TBPS = 10.0  # aggregate L2 load bandwidth, TB/s (assumption)
LAUNCH_US = 2.0  # per launch: latency and the last wave's tail (assumption)
DEVICES = {"h200": ("NVIDIA H200", "sm_90", 132), "h100": ("NVIDIA H100 SXM", "sm_90", 132)}
L2_MB = {"h200": 60, "h100": 50}  # L2 capacity: whether launch 2 can find x there
BATCHES = (128, 1024, 4096, 16384, 65536)
HIDDEN = (128, 1024)
MODES = ("fp32", "tf32", "bf16")
RESULTS = Path(__file__).resolve().parent / "results" / "model"
N_IN, N_OUT = 784, 10


def _elem(mode):
    return 2 if mode == "bf16" else 4


def _row_partials(case: gc.Case) -> tuple[bool, int]:
    """Whether the case's launch 1 makes the last layer's row partials, and R, its row blocks
    (:func:`bench.gpu_compile.step_layout`)."""
    n_blocks, partials = gc.step_layout(case)
    return partials is not None, n_blocks


def _parts_per_step() -> int:
    from pyfused.kernels.grads import PARTS_PER_STEP

    return PARTS_PER_STEP


def _optimizer_states(case: gc.Case) -> int:
    """The state tensors launch 2's update reads and writes: Adam's two, the momentum buffer of SGD."""
    return 2 if case.kernel.endswith("adam") else 1


def launch_terms(kind: str, case: gc.Case, result: dict, sms: int, peak, mode: str) -> dict:
    """The five terms (µs) of one launch and its predicted time: ``kind`` "rows" (launch 1) or "grads" (launch
    2), ``result`` the compile result of ``case`` (grid, config, blocks per SM, shared memory). Any depth
    (``case.widths``), the NLL or MSE head (``step_rows_mse``: float targets), SGD with momentum or Adam
    (``step_grads_adam``: two state tensors)."""
    cfg, grid = result["config"], result["grid"][0]
    s, B, w = _elem(mode), case.n_rows, case.widths
    L = len(w) - 1  # layers; layer i maps w[i] → w[i + 1], the last hidden layer is L − 2
    n_out, n_last = w[-1], w[-2]
    resident = max(1, result["blocks_per_sm"]) * sms
    waves = math.ceil(grid / resident)
    hidden = sum(w[1:-1])
    partials, n_blocks = _row_partials(case)  # launch 1 makes the last layer's dW per row block, launch 2 sums them
    part_bytes = 4 * n_blocks * n_out * (n_last + 1) if partials else 0
    products = [w[i] * w[i + 1] for i in range(L)]
    target = s * B * n_out if case.kernel.endswith("mse") else 8 * B
    if kind == "rows":
        bm, bk, bh = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["BLOCK_H"]
        groups = grid // math.ceil(B / bm)  # G programs per row block share the last hidden layer (HSPLIT)
        slices = [math.ceil(w[i + 1] / bh) for i in range(L - 1)]  # each hidden layer's slices
        mine = slices[:-1] + [math.ceil(slices[-1] / groups)]  # a program's: its share of the last one
        flops = 2 * B * (sum(products) + sum(products[1:]) + (products[-1] if partials else 0))
        # a program's row tile of each layer's input once per slice it makes: each slice's K loop reloads it, and
        # the pipelined loops' 16-byte loads are cp.async.cg, which bypass L1 (in the sm_90 PTX); the weights
        # once per row block (the last layer's twice: forward and backward), shared by its G programs; the
        # earlier layers' weights again in their backward, which re-reads the next gradient's tile per slice;
        # the target, the activations, their gradients and dz
        l2 = s * grid * bm * sum(w[i] * mine[i] for i in range(L - 1))
        l2 += s * grid * bm * sum(w[j + 2] * slices[j] for j in range(L - 2))
        l2 += s * grid // groups * (sum(products[:-1]) + 2 * products[-1] + sum(products[1:-1]))
        l2 += target + s * B * (2 * hidden + n_out)
        if groups > 1:  # each its share of the slices; the last also the G partials and every slice's backward
            chain = mine[-1] * (math.ceil(w[-3] / bk) + 1) + groups + slices[-1]
            l2 += 2 * 4 * grid * bm * cfg["BLOCK_OUT"] + s * B * n_last  # partials; the others' activations
        else:
            chain = slices[-1] * (math.ceil(w[-3] / bk) + 2)
        chain += sum(slices[i] * (math.ceil(w[i] / bk) + 1) for i in range(L - 2))  # earlier layers, forward
        chain += sum(slices[j] * (math.ceil(w[j + 2] / bk) + 1) for j in range(L - 2))  # and backward
        # x, the target and the weights in; the activations, their gradients and dz out, once (the backward
        # rows read the block's activations back from L2, just written)
        hbm = s * (B * w[0] + sum(products)) + target + s * B * (2 * hidden + (0 if partials else n_out)) \
            + part_bytes
    else:
        bms, bn, bk, br = cfg["BLOCK_MS"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_R"]
        split = result.get("split", 1)
        rows = math.ceil(B / split)
        layers = L - 1 if partials else L  # with the row partials, the last layer's tiles only sum them
        flops = 2 * B * sum(products[:layers])
        stats = math.ceil(n_blocks / br)  # the statistics every program sums
        # the partials buffer: S > 1, or a tile summed and updated a part at a time (EPILOGUE_N) at S = 1 too
        parts = split > 1 or cfg.get("EPILOGUE_N", bn) < bn
        chain = math.ceil(rows / bk) + stats + (split if parts else 0)
        if partials:  # R partials, PARTS_PER_STEP loads in flight per step
            chain = max(chain, math.ceil(n_blocks / _parts_per_step()) + stats)
        # each tile its rows of D_i and of A_i, less the columns its masks leave out (past n_{i+1}, n_i)
        l2 = sum(split * s * rows * (math.ceil(w[i] / bn) * w[i + 1] + math.ceil(w[i + 1] / bms[i]) * w[i])
                 for i in range(layers)) + part_bytes
        params = sum(products) + (sum(w[1:]) if case.bias else 0)
        l2 += (2 * split * 4 * params if parts else 0) + grid * 8 * n_blocks
        # A_i and D_i of the reduced layers (x, the hidden gradients and activations, dz) once, or the
        # partials; the parameters and the optimizer's states in and out
        hbm = s * B * sum(w[i] + w[i + 1] for i in range(layers)) + part_bytes \
            + s * 2 * (1 + _optimizer_states(case)) * params
    terms = {
        "math": flops / peak.flops[mode] * sms * math.ceil(grid / sms) / grid * 1e6,
        "chain": waves * chain * STEP_NS * 1e-3,
        "L2": l2 / (L2_TBPS * 1e12) * 1e6,
        "HBM": hbm / peak.bandwidth * 1e6,
    }
    bound = max(terms, key=terms.get)
    return dict(terms, time=terms[bound] + LAUNCH_US, bound=bound, grid=grid, waves=waves)


def work_roofline(B: int, h: int, mode: str, peak, *, n_in: int = N_IN, n_out: int = N_OUT, extra_hidden=(),
                  loss: str = "nll", optimizer: str = "sgd") -> float:
    """The step's roofline (µs): :func:`bench.roofline.work`'s ``train_step`` (bias, momentum) at the peaks —
    784 → h → 10 with NLL and SGD unless told otherwise."""
    flops, nbytes = work("train_step", B, n_in, h, n_out, True, _elem(mode), 0.9, extra_hidden=tuple(extra_hidden),
                         loss=loss, optimizer=optimizer)
    return peak.bound_s(flops, nbytes, mode) * 1e6


def two_launch_floor(B: int, h: int, mode: str, peak, l2_mb: float) -> float:
    """The least time (µs) any two-launch step can take under these assumptions, whatever its tiles: launch 1
    reads x and the weights, makes the last layer's gradient (as the row partials do) and writes the hidden
    layer's gradient once — nothing else of the B rows need cross HBM —; launch 2 reads it and x again (from
    L2 where x fits in it, else from HBM) and reads and writes the parameters and momentum; each at least its
    FLOPs at the peak, its bytes at HBM (and L2) bandwidth, plus a launch. Where this floor is above a bar on
    the step, only a step that reads x once (one launch, the weight gradients reduced as the rows stream) can
    meet it."""
    s = _elem(mode)
    params = N_IN * h + h + h * N_OUT + N_OUT
    x = s * B * N_IN
    launch1 = max(2 * B * (N_IN * h + 3 * h * N_OUT) / peak.flops[mode],
                  (x + s * (N_IN * h + h * N_OUT) + s * B * h) / peak.bandwidth)
    reads = x + s * B * h + s * 4 * params
    from_hbm = reads - x if x <= l2_mb * 1e6 else reads
    launch2 = max(2 * B * N_IN * h / peak.flops[mode], from_hbm / peak.bandwidth, reads / (L2_TBPS * 1e12))
    return (launch1 + launch2) * 1e6 + 2 * LAUNCH_US


def _cases(arch, batches=BATCHES, hidden=HIDDEN, modes=MODES):
    out = []
    for B in batches:
        for h in hidden:
            for mode in modes:
                out.append((B, h, mode, gc.Case("step_rows", arch, mode, True, B, N_IN, h, N_OUT, hsplit=1),
                            gc.Case("step_grads", arch, mode, True, B, N_IN, h, N_OUT, split=1),
                            gc.Case("step_rows", arch, mode, True, B, N_IN, h, N_OUT),
                            gc.Case("step_grads", arch, mode, True, B, N_IN, h, N_OUT)))
    return out


# The course's programs as FusedTrainStep runs them (bench.gpu_compile.COURSE): program, launch 1's kernel, launch
# 2's, the loss and the optimizer (SGD with momentum, or Adam) — at their own batch and at COURSE_LARGE_ROWS.
COURSE_STEPS = (
    ("fashion-mnist fit (784-128-10, NLL, SGD)", "step_rows", "step_grads", "nll", "sgd"),
    ("regression (1000-100-10, MSE, SGD / Adam)", "step_rows_mse", "step_grads", "mse", "sgd"),
    ("regression (1000-100-10, MSE, SGD / Adam)", "step_rows_mse", "step_grads_adam", "mse", "adam"),
    ("small net (20-13-8-3, cross-entropy, SGD)", "step_rows", "step_grads", "nll", "sgd"),
)


def _course_cases(arch):
    out = []
    for program, rows_kernel, grads_kernel, loss, optimizer in COURSE_STEPS:
        (n_rows, n_in, hidden, n_out, extra), kernels = gc.COURSE[program]
        assert rows_kernel in kernels and grads_kernel in kernels, program
        for B in dict.fromkeys((n_rows, gc.COURSE_LARGE_ROWS)):
            for mode in MODES:
                sizes = (B, n_in, hidden, n_out)
                out.append((program, loss, optimizer, mode,
                            gc.Case(rows_kernel, arch, mode, True, *sizes, extra_hidden=extra),
                            gc.Case(grads_kernel, arch, mode, True, *sizes, extra_hidden=extra)))
    return out


def _split_of(case: gc.Case, result: dict) -> int:
    """The S of the launch: the case's, else :func:`split_count`'s for the launcher's config — checked against
    the grid the launcher made (its tiles × S, and the loss program), so the model never prices another S."""
    import torch

    from pyfused.kernels.grads import resident_programs, slice_rows, split_count, tile_counts

    tiles = tile_counts(case.widths, result["config"])
    split = case.split if case.split is not None else split_count(
        case.n_rows, sum(tiles), torch.device("cuda"), gc.SM_COUNTS[case.arch], whole_waves=True,
        tensor_cores=case.mode in ("tf32", "bf16", "fp16"), resident=resident_programs(result["config"], "update"))
    split = -(-max(case.n_rows, 1) // slice_rows(case.n_rows, split, result["config"]["BLOCK_K"]))  # grads()'s S
    last = 1 if _row_partials(case)[0] else split  # the row partials' tiles are not split
    if result["grid"][0] != sum(tiles[:-1]) * split + tiles[-1] * last + 1:
        raise RuntimeError(f"{case}: the launcher's grid {result['grid']} is not {tiles} tiles × S = "
                           f"({split}, {last}) + 1")
    return split


def _step(c_rows: gc.Case, c_grads: gc.Case, results: dict, sms: int, peak, mode: str) -> dict:
    """Both launches of one step: their terms, S / G, the step's time."""
    r1 = launch_terms("rows", c_rows, results[c_rows], sms, peak, mode)
    result = dict(results[c_grads], split=_split_of(c_grads, results[c_grads]))
    r2 = launch_terms("grads", c_grads, result, sms, peak, mode)
    groups = r1["grid"] // math.ceil(c_rows.n_rows / results[c_rows]["config"]["BLOCK_M"])
    return dict(S=f"{result['split']} / {groups}", rows_us=r1["time"], rows_bound=r1["bound"], grads_us=r2["time"],
                grads_bound=r2["bound"], grads_grid=r2["grid"], step_us=r1["time"] + r2["time"])


def model(device: str, batches=BATCHES, hidden=HIDDEN, modes=MODES) -> list[dict]:
    name, arch, sms = DEVICES[device]
    peak = peak_for(name)
    table = _cases(arch, batches, hidden, modes)
    results = gc.compile_cases([c for row in table for c in row[3:]])
    rows = []
    for B, h, mode, *cases in table:
        roof = work_roofline(B, h, mode, peak)
        floor = two_launch_floor(B, h, mode, peak, L2_MB[device])
        for label, c_rows, c_grads in (("before", *cases[:2]), ("after", *cases[2:])):
            step = _step(c_rows, c_grads, results, sms, peak, mode)
            rows.append(dict(B=B, hidden=h, mode=mode, version=label, **step, roofline_us=roof,
                             ratio=step["step_us"] / roof, floor_us=floor, floor_ratio=floor / roof))
    return rows


def course_model(device: str) -> list[dict]:
    """The course's programs (:data:`COURSE_STEPS`) at the launchers' choice: each step's launches, its
    roofline (:func:`bench.roofline.work` for its widths, loss and optimizer) and their ratio."""
    name, arch, sms = DEVICES[device]
    peak = peak_for(name)
    table = _course_cases(arch)
    results = gc.compile_cases([c for row in table for c in row[4:]])
    rows = []
    for program, loss, optimizer, mode, c_rows, c_grads in table:
        step = _step(c_rows, c_grads, results, sms, peak, mode)
        roof = work_roofline(c_rows.n_rows, c_rows.n_hidden, mode, peak, n_in=c_rows.n_in, n_out=c_rows.n_out,
                             extra_hidden=c_rows.extra_hidden, loss=loss, optimizer=optimizer)
        rows.append(dict(program=program, optimizer=optimizer, B=c_rows.n_rows, mode=mode, **step,
                         roofline_us=roof, ratio=step["step_us"] / roof))
    return rows


def write(device: str, rows: list[dict], out: Path, course: list[dict] = ()) -> Path:
    name, arch, sms = DEVICES[device]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{device}.md"
    lines = [f"# Performance model of FusedTrainStep on {name} ({arch}, {sms} SMs) — predictions", "",
             f"Generated by `python -m bench.model --device {device}` on {datetime.date.today()}: "
             "784 → hidden → 10, bias, SGD with momentum; launch 1 (forward, loss, hidden gradients: "
             "`step_rows`) and launch 2 (weight gradients with the update: `step_grads`), before (S = G = 1) and "
             "after the splits: S slices of the rows per weight-gradient tile, G programs per row block sharing "
             "the hidden layer. "
             f"Assumptions: {STEP_NS:g} ns per dependent K-step, L2 {L2_TBPS:g} TB/s, {LAUNCH_US:g} µs per launch "
             "(see bench/model.py). Nothing here is measured: no GPU run exists yet. The two-launch floor is "
             "the least any step of two launches can take under the same assumptions, whatever its tiles "
             "(`two_launch_floor`: x read in both, the hidden layer's gradient written and read once). Launch 1's L2 "
             "term counts a program's row tile once per hidden slice it makes (until 2026-12-04 it was counted "
             "once, which put hidden 1024 in TF32 and bf16 at 1.39–1.48× the roofline from 16384 rows instead "
             "of the 1.74–2.14× below).", "",
             "| B | hidden | mode | version | S / G | launch 1 µs (bound) | launch 2 µs (bound, grid) | step µs | "
             "roofline µs | step / roofline | two-launch floor µs (/ roofline) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [table_row(r) for r in rows]
    if course:
        lines += ["", "## The course's programs (FusedTrainStep, the launchers' choice)", "",
                  "Each program's step at its own batch and at "
                  f"{gc.COURSE_LARGE_ROWS} rows: its widths, loss (NLL or MSE on the logits) and optimizer (SGD "
                  "with momentum, or Adam: two state tensors), the roofline `bench.roofline.work` gives for them. "
                  "Bias on every layer (the course's fashion-MNIST fit has none and the small net has it on the "
                  "output only: their rooflines and launches differ by those biases).", "",
                  "| program | optimizer | B | mode | S / G | launch 1 µs (bound) | launch 2 µs (bound, grid) | "
                  "step µs | roofline µs | step / roofline |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in course:
            lines.append(f"| {r['program']} | {r['optimizer']} | {r['B']} | {r['mode']} | {r['S']} | "
                         f"{r['rows_us']:.1f} ({r['rows_bound']}) | {r['grads_us']:.1f} ({r['grads_bound']}, "
                         f"{r['grads_grid']}) | {r['step_us']:.1f} | {r['roofline_us']:.2f} | {r['ratio']:.2f}× |")
    path.write_text("\n".join(lines) + "\n")
    return path


def table_row(r: dict) -> str:
    """One row of :func:`model` as a line of the results' first table."""
    return (f"| {r['B']} | {r['hidden']} | {r['mode']} | {r['version']} | {r['S']} | "
            f"{r['rows_us']:.1f} ({r['rows_bound']}) | {r['grads_us']:.1f} ({r['grads_bound']}, "
            f"{r['grads_grid']}) | {r['step_us']:.1f} | {r['roofline_us']:.2f} | {r['ratio']:.2f}× | "
            f"{r['floor_us']:.1f} ({r['floor_ratio']:.2f}×) |")


def _committed_rows(device_name: str, root: Path | None) -> list[list[str]]:
    """The cells of every table row of the committed ``bench/results/model/<device>.md`` for a CUDA device of
    that name (H200, H100; else none)."""
    device = next((key for key in ("h200", "h100") if key in device_name.lower()), None)
    path = (root or RESULTS) / f"{device}.md"
    if device is None or not path.exists():
        return []
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]


def committed(device_name: str, root: Path | None = None) -> dict:
    """The committed predictions for a CUDA device of that name (H200, H100; else {}): ``{(B, hidden, mode):
    (launch 1 µs, launch 2 µs, step µs)}`` of the "after" rows of ``bench/results/model/<device>.md`` — what
    ``python -m bench.gpu_check`` puts beside its measurements."""
    return {(int(cells[0]), int(cells[1]), cells[2]): tuple(float(cells[i].split()[0]) for i in (5, 6, 7))
            for cells in _committed_rows(device_name, root) if len(cells) >= 10 and cells[3] == "after"}


def committed_course(device_name: str, root: Path | None = None) -> dict:
    """The committed course-table predictions for a CUDA device of that name (else {}): ``{(program, optimizer,
    B, mode): step µs}`` — what ``python -m bench.gpu_check`` puts beside its course timings."""
    return {(cells[0], cells[1], int(cells[2]), cells[3]): float(cells[7])
            for cells in _committed_rows(device_name, root)
            if len(cells) == 10 and cells[0] in gc.COURSE and cells[1] in ("sgd", "adam")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=sorted(DEVICES), default="h200")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/model)")
    sweep = parser.add_argument_group("another sweep", "print the first table's rows for these instead of writing "
                                      "the results (the numbers of rows_config's docstring between the batches "
                                      "and widths of the results)")
    sweep.add_argument("--batches", type=int, nargs="+")
    sweep.add_argument("--hidden", type=int, nargs="+")
    sweep.add_argument("--modes", nargs="+", choices=MODES)
    args = parser.parse_args(argv)
    if args.batches or args.hidden or args.modes:
        if args.out:
            parser.error("--out is where the results are written; --batches, --hidden and --modes print instead")
        rows = model(args.device, args.batches or BATCHES, args.hidden or HIDDEN, args.modes or MODES)
        print("\n".join(table_row(r) for r in rows))
        return
    out = args.out or RESULTS
    print(write(args.device, model(args.device), out, course_model(args.device)))


if __name__ == "__main__":
    main()
