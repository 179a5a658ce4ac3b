"""GPU readiness without a GPU: every kernel compiled for sm_80 and sm_90 by Triton's real compiler.

Default run: every kernel of a training step (module path, FusedTrainStep, accumulating) at the seed shape
(B=128, 784 → 128 → 10) × {sm_80, sm_90} × {fp32 IEEE, TF32, bf16, fp16, fp64} × {bias, no bias} × the
activations, the same kernels of a three-layer net (784 → 128 → 128 → 10), the other variants (log-probabilities,
inference, MSE heads, Adam, the optimizer's other modes) at the seed shape in fp32 and bf16 on sm_90, and the
extremes of the size sweep: each must compile, fit the architecture's shared memory per block and leave room for
a block per SM; the kernels of a seed step, two- and three-layer, must not spill. The slow set compiles every
variant in every mode, the course's programs at their own shapes, and the compile report's size sweep. The splits
(the weight gradients' over the rows at large B, the row kernel's over the hidden layer at small B) are compiled where
the launchers take them, the train step's MSE rows where the class head's configuration spilled, and the launches
that spilled with either Triton (3.6: the GPU machine's) before their configurations changed. Compiles run
in a process without ``TRITON_INTERPRET``, in parallel, cached under the temp dir (``PYFUSED_COMPILE_CACHE``).
The committed compile reports must list the configurations and grids the launchers choose now (captured, not
compiled): a configuration change fails until they are regenerated.
Under the GPU machine's Triton (older than 3.8) the default set is compiled for sm_90 only (that machine's H200).
"""
import functools
from pathlib import Path

import pytest
import torch
import triton

from bench import gpu_compile as gc
from bench.compile_report import SWEEP_KERNELS, launch_cells, refresh, report_sets, table_rows

SEED = gc.seed_cases() + gc.seed_cases(gc.DEEP_KERNELS, depth=3)
OTHERS = [c for c in gc.seed_cases(tuple(k for k in gc.ALL_KERNELS if k not in gc.SEED_KERNELS), ("sm_90",))
          if c.mode in ("fp32", "bf16") and c.bias and c.activation == "relu"]
SAMPLE = [  # the extremes of the sweep: fp32 IEEE (FMA, no tensor cores: 512 outputs at most) and bf16 (wgmma)
    gc.Case(kernel, arch, mode, True, *shape)
    for kernel in ("forward_loss", "rows_loss", "grads", "step_rows", "step_grads")
    for arch, mode, shape in (("sm_90", "fp32", (65536, 4096, 1024, 512)), ("sm_90", "bf16", (65536, 4096, 1024, 1024)),
                              ("sm_80", "bf16", (1, 16, 16, 2)))
]
SPLIT = [  # the split weight-gradient reduction (large B), every epilogue, in the modes that differ in code
    gc.Case(kernel, arch, mode, True, 16384, 784, 128, 10)
    for kernel in ("grads", "step_grads", "step_grads_adam", "step_accumulate")
    for arch, mode in (("sm_90", "fp32"), ("sm_90", "tf32"), ("sm_90", "bf16"), ("sm_90", "fp64"), ("sm_80", "fp32"),
                       ("sm_80", "bf16"))
]
LARGE = [  # the train step's and a module forward's 64- and 128-row tiles (TF32, 16-bit) from LARGE_BATCH rows
    gc.Case(kernel, arch, mode, True, 16384, 784, 128, 10)
    for kernel in ("step_rows", "step_rows_mse", "forward_loss", "forward")
    for arch, mode in (("sm_90", "tf32"), ("sm_90", "bf16"), ("sm_90", "fp16"), ("sm_80", "tf32"), ("sm_80", "bf16"))
] + [  # the train step's 128-row tiles beyond the seed's widths: hidden 1024, 128 outputs, sigmoid, no bias
    gc.Case("step_rows", arch, mode, bias, B, 784, hidden, out, activation=act)
    for arch in gc.ARCHS for mode in ("bf16", "fp16")
    for bias, B, hidden, out, act in ((True, 65536, 1024, 10, "relu"), (True, 16384, 48, 128, "relu"),
                                      (False, 16384, 128, 10, "sigmoid"))
]
STEP_WORK = [  # the train step's 128-row tiles below 16384 rows (rows_config: from STEP_LARGE_WORK rows × hidden
    # features), with the hidden split where the row blocks leave SMs idle (K steps of 32 in 16-bit dtypes then)
    gc.Case(kernel, arch, mode, bias, B, 784, hidden, out, activation=act)
    for kernel in ("step_rows", "step_rows_mse") for arch in gc.ARCHS
    for mode, bias, B, hidden, out, act in (
        ("tf32", True, 512, 1024, 10, "relu"), ("bf16", True, 512, 1024, 10, "relu"),
        ("bf16", False, 1024, 1024, 10, "sigmoid"), ("fp16", False, 1024, 1024, 10, "sigmoid"),
        ("tf32", True, 4096, 128, 10, "sigmoid"), ("bf16", True, 4096, 128, 10, "sigmoid"),
        ("bf16", True, 512, 1024, 128, "relu"), ("tf32", False, 1024, 1024, 32, "sigmoid"),
        ("tf32", False, 2048, 128, 10, "relu"))  # TF32 from half the work, from 512 rows
]
UNALIGNED_SPLIT = [  # the course's regression (1000 -> 100 -> 10) at small B in fp32 IEEE: two slices of 64, split
    gc.Case(kernel, arch, "fp32", bias, B, 1000, 100, 10, activation=act)
    for kernel in ("step_rows", "step_rows_mse") for arch in gc.ARCHS
    for bias, B, act in ((True, 64, "relu"), (False, 64, "sigmoid"), (True, 1, "sigmoid"), (False, 255, "relu"))
]
ALIGNED_SPLIT = [  # the seed's widths and others of 65-128 hidden features up to 1024 rows in fp32 IEEE, likewise
    gc.Case(kernel, arch, "fp32", bias, B, n_in, hidden, out, activation=act)
    for kernel in ("step_rows", "step_rows_mse") for arch in gc.ARCHS
    for bias, B, n_in, hidden, out, act in ((True, 1024, 784, 128, 10, "relu"), (False, 1, 784, 80, 16, "sigmoid"),
                                            (False, 640, 64, 96, 7, "relu"), (True, 300, 2048, 112, 10, "sigmoid"))
]
PARTIALS = [  # the train step's last-layer row partials (large-batch tiles): made in launch 1, summed in launch 2
    gc.Case(kernel, arch, mode, True, 16384, 784, 128, 10)
    for kernel in ("step_rows", "step_grads", "step_accumulate")
    for arch in gc.ARCHS for mode in ("tf32", "bf16")
] + [  # and below 16384 rows with the 128-row tiles taken from the work (TF32: half of it from 512 rows), whose
    # launch 2 keeps the narrow update tiles (Adam's at 1024 rows spills 8 B on sm_80 with Triton 3.6 only: that
    # stack compiles sm_90 here)
    gc.Case(kernel, arch, "tf32", bias, B, 784, hidden, 10)
    for kernel in ("step_grads", "step_grads_adam", "step_accumulate") for arch in gc.ARCHS
    for bias, B, hidden in ((True, 2048, 128), (False, 1024, 256))
]
HSPLIT = [  # the row kernel's hidden split (small B, wide hidden layers): the train step in every mode but fp64; the
    # module forward where it splits (TF32, 16-bit dtypes: 2 groups of 64 at the seed shape)
    gc.Case(kernel, arch, mode, True, 128, 784, 1024, 10)
    for kernel in ("step_rows", "step_rows_mse") for arch in gc.ARCHS for mode in gc.MODES if mode != "fp64"
] + [gc.Case(kernel, arch, mode, True, 128, 784, 1024, 10)
     for kernel in ("forward_loss", "forward", "forward_eval") for arch in gc.ARCHS for mode in ("tf32", "bf16")]
COURSE_LARGE = [  # the course's unaligned widths at a large batch, where the wide tiles spilled 8 B–1.8 KB
    gc.Case(kernel, arch, "bf16", True, gc.COURSE_LARGE_ROWS, n_in, hidden, out, extra_hidden=extra)
    for kernel, arch, (n_in, hidden, out, extra) in (
        ("step_rows_mse", "sm_90", (1000, 100, 10, ())), ("step_grads", "sm_80", (1000, 100, 10, ())),
        ("step_grads_adam", "sm_90", (1000, 100, 10, ())), ("step_grads", "sm_80", (20, 13, 3, (8,))))
]
MSE = [  # the train step's MSE rows where the class head's warps and K steps spilled 8–28 B (rows_config(loss=))
    gc.Case("step_rows_mse", arch, mode, True, 128, 784, hidden, out, extra_hidden=extra)
    for arch in gc.ARCHS
    for mode, hidden, out, extra in (("fp32", 16, 10, ()), ("tf32", 16, 10, ()), ("bf16", 16, 10, ()),
                                     ("bf16", 128, 128, ()), ("bf16", 128, 1024, ()), ("fp32", 128, 10, (128,)))
]
RESPILLS = [  # launches that spilled 4-96 B at the configs before this list, with Triton 3.6's ptxas (the GPU
    # machine's) or 3.8's (the sweep's MSE and Adam kernels), or at the variant a rule avoids (float64 MSE at 3
    # stages): not filtered by DEFAULT_ARCHS, so each stack compiles its sm_80 ones too (a few compiles)
    gc.Case("forward_eval", "sm_90", "fp64", False, activation="relu"),
    gc.Case("forward_eval", "sm_90", "fp64", False, activation="sigmoid"),
    gc.Case("grads", "sm_90", "fp64", True, 64, 1000, 100, 10),
    gc.Case("step_rows", "sm_90", "fp64", True, 64, 20, 13, 3, activation="sigmoid", extra_hidden=(8,)),
    gc.Case("step_rows", "sm_90", "fp64", False, 64, 20, 13, 3, activation="sigmoid", extra_hidden=(8,)),
    gc.Case("step_grads", "sm_90", "fp64", True, 64, 20, 13, 3, extra_hidden=(8,)),
    gc.Case("step_grads", "sm_90", "fp64", True, 128, 784, 16, 10),
    gc.Case("step_grads", "sm_80", "tf32", False, 64, 1000, 100, 10),
    gc.Case("step_grads_adam", "sm_90", "tf32", True, 128, 784, 16, 10),
    gc.Case("step_accumulate", "sm_80", "fp64", True, 1, 16, 16, 2),
    gc.Case("forward_mse", "sm_90", "fp32", True, 4097, 784, 128, 10),
    gc.Case("forward_mse", "sm_90", "tf32", True, 4097, 784, 128, 10),
    gc.Case("forward_mse", "sm_80", "tf32", True, 1, 16, 16, 2),
    gc.Case("forward_mse", "sm_80", "tf32", True, 65536, 784, 128, 10),
    gc.Case("forward_mse", "sm_90", "fp64", True, 64, 1000, 100, 10, activation="sigmoid"),
    gc.Case("step_rows", "sm_80", "bf16", False, 1024, 784, 1024, 10, activation="sigmoid"),  # hidden split, K 64
    gc.Case("step_rows_mse", "sm_80", "fp16", False, 1024, 784, 1024, 10, activation="sigmoid"),
]
# The GPU machine's stack (Triton older than 3.8, CI's second stack) compiles the default set for that machine's GPU
# only (an H200, sm_90): the development stack compiles it for both architectures, and the older stack's cold
# compiles for sm_80 cost CI minutes it does not have (CI ran 1261 s with both, over its 20 minutes).
DEFAULT_ARCHS = ("sm_90",) if tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8) else tuple(gc.ARCHS)
SEED, OTHERS, SAMPLE, SPLIT, LARGE, STEP_WORK, UNALIGNED_SPLIT, ALIGNED_SPLIT, PARTIALS, HSPLIT, COURSE_LARGE, MSE = (
    [c for c in cases if c.arch in DEFAULT_ARCHS]
    for cases in (SEED, OTHERS, SAMPLE, SPLIT, LARGE, STEP_WORK, UNALIGNED_SPLIT, ALIGNED_SPLIT, PARTIALS, HSPLIT,
                  COURSE_LARGE, MSE))
DEFAULT = (SEED + OTHERS + SAMPLE + SPLIT + LARGE + STEP_WORK + UNALIGNED_SPLIT + ALIGNED_SPLIT + PARTIALS + HSPLIT
           + COURSE_LARGE + MSE + RESPILLS)
EVERY = [c for c in gc.seed_cases(tuple(gc.ALL_KERNELS)) + gc.seed_cases(tuple(gc.ALL_KERNELS), depth=3)
         + gc.course_cases() + gc.course_cases(n_rows=gc.COURSE_LARGE_ROWS)
         if c not in set(DEFAULT)]
SWEEP = [c for c in gc.sweep_cases(SWEEP_KERNELS) if c not in SAMPLE]  # the compile report's sweep


@pytest.fixture(scope="module")
def default_results():
    return gc.compile_cases(DEFAULT)


@pytest.fixture(scope="module")
def every_results():
    return gc.compile_cases(EVERY)


@pytest.fixture(scope="module")
def sweep_results():
    return gc.compile_cases(SWEEP)


def _check_fits(case, result):
    assert result["error"] is None, f"{case} does not compile: {result['error']}"
    arch = gc.ARCHS[case.arch]
    assert result["shared"] <= arch.smem_per_block, (
        f"{case} ({result['config']}) needs {result['shared']} B of shared memory, {arch.name} has "
        f"{arch.smem_per_block} per block")
    assert result["blocks_per_sm"] >= 1, f"{case} ({result['config']}): no block fits an SM ({result})"


@pytest.mark.parametrize("case", DEFAULT, ids=str)
def test_compiles_and_fits(case, default_results):
    _check_fits(case, default_results[case])


@pytest.mark.parametrize("case", SEED + LARGE + PARTIALS + HSPLIT + COURSE_LARGE + MSE + RESPILLS, ids=str)
def test_seed_step_kernels_do_not_spill(case, default_results):
    result = default_results[case]
    assert result["error"] is None, result["error"]
    assert (result["spill_stores"], result["spill_loads"]) == (0, 0), (
        f"{case} ({result['config']}) spills {result['spill_stores']} B / loads {result['spill_loads']} B "
        f"per thread with {result['regs']} registers")


@pytest.mark.parametrize("case", LARGE, ids=str)
def test_large_batches_take_tensor_core_row_tiles(case, default_results):
    """From LARGE_BATCH rows the row kernel's TF32 and 16-bit launches take 64-row tiles, 8 warps — 128 rows for
    the train step's (two layers, hidden 128, 10 outputs; hidden slices of 64 in TF32) — and do not spill."""
    result = default_results[case]
    config = result["config"]
    tall = case.kernel.startswith("step_rows")
    assert (config["BLOCK_M"], config["num_warps"]) == (128 if tall else 64, 8), config
    if tall and case.mode == "tf32":
        assert config["BLOCK_H"] == 64, config
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, result


@pytest.mark.parametrize("case", STEP_WORK, ids=str)
def test_the_train_step_takes_tensor_core_row_tiles_from_enough_work(case, default_results):
    """Below 16384 rows the train step's row pass takes its 128-row tiles where rows × hidden features reach
    STEP_LARGE_WORK (TF32: half of it from 512 rows), and the hidden split where those row blocks leave SMs
    idle (hidden 1024 at 512 and 1024 rows: 4 and 8 blocks), with K steps of 32 in 16-bit dtypes then; none
    spills."""
    result = default_results[case]
    config = result["config"]
    assert (config["BLOCK_M"], config["num_warps"]) == (128, 8), config
    if case.n_hidden == 1024 or case.n_rows == 2048:  # 4, 8 and 16 row blocks: the split fills idle SMs
        assert config["HSPLIT"], config
    if config["HSPLIT"] and case.mode != "tf32":
        assert config["BLOCK_K"] == 32, config
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, result


@pytest.mark.parametrize("case", UNALIGNED_SPLIT + ALIGNED_SPLIT
                         + [c for c in SEED if c.kernel.startswith("step_rows") and c.mode == "fp32" and c.depth == 2],
                         ids=str)
def test_fp32_steps_split_their_hidden_layer_at_small_batches(case, default_results):
    """fp32 IEEE, 65-128 hidden features — the course's 1000 → 100 → 10 up to 256 rows, the seed's 784 → 128 →
    10 and other aligned widths up to 1024 —: two hidden slices of 64, K steps of 32, 3 stages, and the hidden
    split in G = 2 (twice the programs of the row blocks) where those fit the arch's SMs in one wave (all but
    1024 rows on sm_80's 108: there the FMA term binds either way); none spills."""
    result = default_results[case]
    config = result["config"]
    blocks = triton.cdiv(case.n_rows, 16)
    groups = 2 if 2 * blocks <= gc.SM_COUNTS[case.arch] else 1
    assert groups == 2 or (case.arch, case.n_rows) == ("sm_80", 1024)
    assert (config["BLOCK_H"], config["BLOCK_K"], config["num_stages"], config["HSPLIT"]) == (64, 32, 3, groups > 1)
    assert result["grid"] == [groups * blocks]
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, result


@pytest.mark.parametrize("case", PARTIALS, ids=str)
def test_large_batch_steps_take_the_row_partials(case, default_results):
    """With the large-batch row tiles the train step's launch 1 makes the last layer's row partials (no dz) and
    launch 2's last-layer tiles sum them, unsplit; both compile without spills (test above)."""
    config = default_results[case]["config"]
    assert config["ROW_PARTIALS"], config
    if case.kernel == "step_rows":
        assert not config["STORE_DZ"], config
    else:
        assert tuple(config["SPLIT"])[-1] is False, config


@pytest.mark.parametrize("case", SPLIT, ids=str)
def test_split_reduction_is_compiled_and_spills_at_most_a_few_bytes(case, default_results):
    """The split variants (S > 1 at B = 16384 on both GPUs' SM counts) compile; spills stay within 8 B (fp32
    IEEE's update epilogue on sm_90 spills 8 B, measured with Triton 3.8)."""
    result = default_results[case]
    assert result["error"] is None, result["error"]
    partials = result["config"].get("ROW_PARTIALS", False)  # the last layer's tiles sum the row partials
    assert tuple(result["config"]["SPLIT"]) == (True, not partials)
    assert result["spill_stores"] <= 8, f"{case} ({result['config']}) spills {result['spill_stores']} B"


@pytest.mark.parametrize("case", HSPLIT, ids=str)
def test_hidden_split_is_what_the_launcher_takes_at_small_batches(case, default_results):
    """B = 128, hidden 1024: 8 row blocks of 16, 8 slices of 128 (16 of 64 for a forward only): the launcher
    splits every row block into a group per slice, up to the SMs (groups of whole slices)."""
    result = default_results[case]
    slices = 1024 // result["config"]["BLOCK_H"]
    per_group = triton.cdiv(slices, min(slices, triton.cdiv(gc.SM_COUNTS[case.arch], 8)))
    assert result["config"]["HSPLIT"] is True and result["grid"] == [8 * triton.cdiv(slices, per_group)]


@pytest.mark.parametrize("case", HSPLIT + SPLIT[:4] + SEED[:1], ids=str)
def test_split_reductions_order_their_loads_after_an_acq_rel_counter(case, default_results):
    """In the PTX of a split launch: the arrival counter is an acq_rel atomic at GPU scope (release of this
    program's partial, acquire of the others') and the last program's loads of the others' values bypass L1
    (``ld.global.cg``), after a barrier; a launch without a split has no such atomic (the count can fail)."""
    ops = default_results[case]["ptx_ops"]
    split = case in HSPLIT or case in SPLIT
    assert (ops["acq_rel_atomics"] > 0) == split and (ops["cg_loads"] > 0) == split, ops
    assert ops["barriers"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("case", EVERY, ids=str)
def test_every_variant_compiles_and_fits(case, every_results):
    _check_fits(case, every_results[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", SWEEP, ids=str)
def test_sweep_compiles_and_fits(case, sweep_results):
    _check_fits(case, sweep_results[case])


def test_capture_records_the_launchers_own_config():
    """The check compiles what the launcher launches: its config function's choice, grid and flags."""
    from pyfused.kernels.grads import grads_config, split_count
    from pyfused.kernels.rows import rows_config

    rows, n_in, hidden, out = 4097, 784, 256, 300
    launch = gc.capture(gc.Case("forward_loss", "sm_90", "tf32", False, rows, n_in, hidden, out))
    cfg = rows_config(rows, (n_in, hidden, out), torch.float32, forward=True, backward=False, precision="tf32")
    assert {k: launch.kwargs[k] for k in cfg} == cfg
    assert launch.grid == (triton.cdiv(rows, cfg["BLOCK_M"]),)
    assert launch.kwargs["HAS_BIAS"] == (False, False) and launch.kwargs["LOSS"] == "class"
    assert (launch.kwargs["STATS"], launch.kwargs["STORE_OUT"], launch.kwargs["BACKWARD"]) == (True, False, False)
    assert launch.kwargs["PRECISION"] == "tf32"
    launch = gc.capture(gc.Case("grads", "sm_80", "bf16", True, rows, n_in, hidden, out))
    cfg = grads_config(rows, (n_in, hidden, out), torch.bfloat16, "store")
    tiles = [triton.cdiv(m, cfg["BLOCK_MS"][i]) * triton.cdiv(n, cfg["BLOCK_N"])
             for i, (m, n) in enumerate(((hidden, n_in), (out, hidden)))]
    assert {k: launch.kwargs[k] for k in cfg} == cfg
    assert sum(tiles) >= 2 * gc.SM_COUNTS["sm_80"]  # a full grid: no split
    assert launch.kwargs["SPLIT"] == (False, False) and launch.grid == (sum(tiles),)
    assert launch.args[0].dtype == torch.bfloat16 and launch.kwargs["PRECISION"] == "ieee"
    launch = gc.capture(gc.Case("step_grads", "sm_90", "fp32", True, 16384, 784, 128, 10))
    cfg = grads_config(16384, (784, 128, 10), torch.float32, "update")
    tiles = [triton.cdiv(m, cfg["BLOCK_MS"][i]) * triton.cdiv(n, cfg["BLOCK_N"])
             for i, (m, n) in enumerate(((128, 784), (10, 128)))]
    split = split_count(16384, sum(tiles), torch.device("cuda"), gc.SM_COUNTS["sm_90"], whole_waves=True)
    assert split == 4 and launch.kwargs["SPLIT"] == (True, True)  # 58 tiles (fp32 IEEE: 16 columns) for 132 SMs
    assert launch.grid == (sum(tiles) * split + 1,)  # and the loss program
    launch = gc.capture(gc.Case("step_grads", "sm_90", "fp32", True, extra_hidden=(64,)))
    assert launch.kwargs["N_LAYERS"] == 3 and launch.kwargs["EPILOGUE"] == "update"
    assert launch.grid == (sum(triton.cdiv(m, b) * triton.cdiv(n, 16) for m, n, b in
                               ((128, 784, 128), (64, 128, 64), (10, 64, 16))) + 1,)


@pytest.mark.parametrize("arch, warps, regs, shared, expected", [
    ("sm_90", 4, 255, 0, (2, "regs")),  # 255·32 → 8192 per warp; 16384 per sub-partition: 2 warps each
    ("sm_90", 8, 40, 0, (6, "regs")),  # 1280 per warp: 12 warps per sub-partition, 48 per SM
    ("sm_90", 4, 32, 0, (16, "warps")),  # 64 warps per SM
    ("sm_90", 1, 16, 0, (32, "blocks")),
    ("sm_80", 4, 32, 100 * 1024, (1, "smem")),  # 102400 + 1024 reserved → 103424; 167936 per SM
    ("sm_90", 4, 32, 48 * 1024, (4, "smem")),  # 50176 per block; 233472 per SM
    ("sm_80", 4, 32, 164 * 1024, (0, "smem")),  # over the 163 KB per block
    ("sm_90", 32, 72, 0, (0, "regs")),  # 2304 per warp × 32 warps > 65536
])
def test_blocks_per_sm(arch, warps, regs, shared, expected):
    assert gc.blocks_per_sm(gc.ARCHS[arch], warps, regs, shared) == expected


def test_parse_ptxas():
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function 'mlp_forward_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for mlp_forward_kernel\n"
           "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]\n")
    assert gc.parse_ptxas(log) == dict(regs=255, spill_stores=12, spill_loads=8, stack=16, static_smem=0)
    with pytest.raises(ValueError, match="registers"):
        gc.parse_ptxas("ptxas info    : 0 bytes gmem\n")


REPORTS = sorted((Path(gc.__file__).resolve().parent / "results" / "compile").glob("**/sm_*.md"))
assert len(REPORTS) == 4, REPORTS  # each Triton's folder (3.8 at the top, triton-3.6), sm_80 and sm_90


_launch_cells = functools.lru_cache(maxsize=None)(launch_cells)  # sm_80's and sm_90's cases, in both reports


def _identity(case, row: dict) -> dict:
    """The cells of ``row`` that name a case, and what they say for ``case`` (the sweep has no bias column, and
    its kernel column no activation)."""
    label = case.kernel if "bias" not in row or case.activation == "relu" else f"{case.kernel} ({case.activation})"
    want = dict(kernel=label, mode=case.mode, bias="yes" if case.bias else "no", shape=case.shape)
    return {key: value for key, value in want.items() if key in row}


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_the_committed_compile_reports_have_the_launchers_configs(path):
    """Each committed report (``python -m bench.compile_report``, each Triton's) lists the cases the report
    compiles now, in order, with the config and grid the launchers choose now: a changed configuration function
    or case list fails here until the reports are regenerated. (Captures only: nothing is compiled.)"""
    arch = path.stem
    expected = [c for cases in report_sets((arch,)).values() for c in dict.fromkeys(cases)]
    rows = [row for table in table_rows(path.read_text(encoding="utf-8")) for row in table]
    assert len(rows) == len(expected), f"{path}: {len(rows)} rows, the report compiles {len(expected)} cases now"
    for case, row in zip(expected, rows):
        want = _identity(case, row)
        assert {key: row[key] for key in want} == want, f"{path}: {case} is not the report's row {row}"
        assert (row["config"], row["grid"]) == _launch_cells(case), f"{path}: {case} is stale: {row}"


def test_refresh_recompiles_only_the_stale_rows(tmp_path):
    """``python -m bench.compile_report --refresh``: in a copy of the committed sm_90 report with one row made
    stale (its grid and resources edited), that row alone is recompiled — the launcher's grid back, the
    resources of a real compile — and every other line but the summary is left as it was."""
    from importlib.metadata import version

    path = tmp_path / "sm_90.md"
    ours = [p for p in REPORTS if p.stem == "sm_90" and f", triton {version('triton')}," in p.read_text("utf-8")]
    if not ours:
        pytest.skip(f"no committed report of triton {version('triton')}")
    lines = ours[0].read_text(encoding="utf-8").splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith("| forward_loss | fp32 | yes |"))
    cells = lines[i].split(" | ")
    edited = list(cells)
    edited[4], edited[5] = "999999", "1"  # grid, regs
    path.write_text("\n".join(lines[:i] + [" | ".join(edited)] + lines[i + 1:]) + "\n", encoding="utf-8")
    done = refresh(path, "sm_90", workers=1)
    assert [str(c) for c in done] == ["forward_loss-sm_90-fp32-bias-128x784x128x10"]
    after = path.read_text(encoding="utf-8").splitlines()
    new = after[i].split(" | ")
    assert new[4] == cells[4] and int(new[5]) > 1 and new[6] == "0/0"
    summary = next(k for k, line in enumerate(lines) if line.startswith("Summary: "))
    assert [a for k, a in enumerate(after) if k not in (i, summary)] == [
        b for k, b in enumerate(lines) if k not in (i, summary)]
    counts = lambda line: line.split(". ")[0]  # noqa: E731  ("Summary: N launches, F failed to compile, S spill")
    assert counts(after[summary]) == counts(lines[summary]) and "--refresh` (last: 1 rows" in after[summary]
    assert refresh(path, "sm_90") == []  # nothing stale now
    path.write_text(path.read_text("utf-8").replace(f", triton {version('triton')},", ", triton 0.1,", 1), "utf-8")
    with pytest.raises(ValueError, match="compiled with triton 0.1"):  # another Triton's report
        refresh(path, "sm_90")
