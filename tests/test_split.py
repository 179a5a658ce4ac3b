"""The split weight-gradient reduction (S slices of the rows per tile, the last program to arrive sums the
partials in slice order) on the kernels: every product and epilogue against float64 and the eager loop, bit
identical from run to run, the grid and the counters; and how S is chosen."""
import pytest
import torch
import triton

import pyfused
from pyfused.kernels import grads as G
from pyfused.kernels.launch import COUNTERS, observe
from utils import DEVICE, TOL, batches, eager_twin, params_and_states_match, step_and_eager, steps_match_eager


@pytest.fixture
def kernels(monkeypatch):
    """The kernel path, with ``force(S)`` choosing S for every launch (the CPU heuristic never splits)."""
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")
    return lambda s: monkeypatch.setattr(G, "split_count", lambda *args, **kwargs: s)


def _products(dtype=torch.float64, rows=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE, dtype)  # noqa: E731
    return r(rows, 24), [r(36, 24), r(5, 36)], [r(rows, 36)], [r(rows, 36), r(rows, 5)]


def _run(x, weights, acts, dpres, split, dx=True):
    outs = [torch.empty_like(weights[0]), weights[0].new_empty(36), torch.empty_like(weights[1]),
            weights[1].new_empty(5)]
    dx_out = torch.empty_like(x) if dx else None
    seen = []
    with observe(seen.append):
        G.grads(x, weights, acts, dpres, need=(True, True), has_bias=(True, True), grads=outs, dx=dx_out,
                split=split)
    return outs + ([dx_out] if dx else []), seen


@pytest.mark.parametrize("split", [2, 3, 4, (2, 4), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_products_match_float64_and_repeat_bit_for_bit(kernels, split, dtype):
    x, weights, acts, dpres = _products(dtype)
    ours, seen = _run(x, weights, acts, dpres, split)
    d1, dz = (d.double() for d in dpres)
    exact = [d1.t() @ x.double(), d1.sum(0), dz.t() @ acts[0].double(), dz.sum(0), d1 @ weights[0].double()]
    for name, a, b in zip(("dw1", "db1", "dw2", "db2", "dx"), ours, exact):
        torch.testing.assert_close(a.double(), b, **TOL[dtype], msg=lambda m: f"{name}: {m}")
    again, _ = _run(x, weights, acts, dpres, split)
    assert all(torch.equal(a, b) for a, b in zip(ours, again))
    used = [c for (kernel, device, _), c in COUNTERS.items() if kernel == "grads" and device == x.device]
    assert used and all(int(c.abs().sum()) == 0 for c in used)  # every launch leaves its counters at 0
    cfg = G.grads_config(100, (24, 36, 5), dtype, "store")
    splits = (split, split) if isinstance(split, int) else split
    chunks = [triton.cdiv(triton.cdiv(100, s), cfg["BLOCK_K"]) * cfg["BLOCK_K"] for s in splits]
    tiles = [triton.cdiv(m, cfg["BLOCK_MS"][i]) * triton.cdiv(n, cfg["BLOCK_N"])
             for i, (m, n) in enumerate(((36, 24), (5, 36)))]
    dx_tiles = triton.cdiv(100, cfg["BLOCK_DX"]) * triton.cdiv(24, cfg["BLOCK_DX"])
    assert seen[0].grid == (sum(t * triton.cdiv(100, c) for t, c in zip(tiles, chunks)) + dx_tiles,)


def test_module_backward_with_a_split(kernels):
    kernels(3)
    torch.manual_seed(0)
    model = pyfused.DeepFusedMLP(24, 36, 20, 5, activation=("relu", "sigmoid"), device=DEVICE).double()
    ref = eager_twin(model)
    x = torch.randn(100, 24, dtype=torch.float64, device=DEVICE)
    target = torch.randint(0, 5, (100,), device=DEVICE)
    model.nll_loss(x, target).backward()
    torch.nn.functional.nll_loss(ref(x), target).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL[torch.float64], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("loss,optimizer", [("nll", "sgd"), ("mse", "adam"), ("cross_entropy", "adamw")])
def test_train_step_with_a_split_matches_the_eager_loop(kernels, loss, optimizer, k):
    kernels(3)
    torch.manual_seed(0)
    model = pyfused.DeepFusedMLP(9, 12, 4, device=DEVICE, log_softmax=loss == "nll")
    step, opt, ref, ref_opt = step_and_eager(model, optimizer, loss, k)
    steps_match_eager(step, ref, ref_opt, loss, batches(loss, 90, 9, 4, 4), k)
    params_and_states_match(model, opt, ref, ref_opt)


@pytest.mark.parametrize("split,row_partials,loss,optimizer,k", [
    (1, False, "nll", "sgd", 1), (3, True, "mse", "adam", 1), (3, False, "nll", "sgd", 2), (1, True, "mse", "adam", 2)])
def test_train_step_with_the_epilogue_in_column_parts_matches_the_eager_loop(kernels, monkeypatch, split,
                                                                              row_partials, loss, optimizer, k):
    """Tiles whose partials are summed and updated (or accumulated, k = 2) EPILOGUE_N columns at a time, as the
    wide tiles of TF32, of Adam and of the accumulation are: forced here at 32-column tiles in parts of 16
    (ragged and wholly masked parts at 40 → 36 → 4), through the partials buffer at S = 1 too, and with the last
    layer's row partials."""
    kernels(split)
    from pyfused.kernels import rows as R

    monkeypatch.setattr(R, "row_partials_pay", lambda *args, **kwargs: row_partials)
    config = G.grads_config
    monkeypatch.setattr(G, "grads_config", lambda *args, **kwargs: dict(config(*args, **kwargs), BLOCK_N=32,
                                                                        EPILOGUE_N=16))
    torch.manual_seed(0)
    model = pyfused.DeepFusedMLP(40, 36, 4, device=DEVICE, log_softmax=loss == "nll")
    step, opt, ref, ref_opt = step_and_eager(model, optimizer, loss, k)
    seen = []
    with observe(seen.append):
        steps_match_eager(step, ref, ref_opt, loss, batches(loss, 90, 40, 4, 4), k)
    launches = [s for s in seen if s.name == "grads_kernel"]
    assert launches and all(s.kwargs["SPLIT"] == (True, not row_partials) for s in launches)
    params_and_states_match(model, opt, ref, ref_opt)


def test_the_narrow_update_tiles_per_dtype_and_optimizer():
    """The 16-column update tiles (small B, fp32 IEEE, float64) by the compile report's rules: K steps of 32, 2
    stages; float64 1 stage (SGD past 16 rows 2 warps); Adam K steps of 16 (32 in TF32); SGD in 16-bit dtypes and
    TF32 3 stages."""
    cfg = lambda dtype, opt="sgd": G.grads_config(128, (784, 128, 10), dtype, "update", optimizer=opt)  # noqa: E731
    key = lambda c: (c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])  # noqa: E731
    assert key(cfg(torch.float32)) == (16, 32, 4, 2)
    assert key(cfg(torch.float64)) == (16, 32, 2, 1)
    assert key(G.grads_config(16, (784, 128, 10), torch.float64, "update")) == (16, 16, 4, 1)
    assert key(cfg(torch.float64, "adam")) == (16, 32, 4, 1)
    assert key(cfg(torch.float32, "adam")) == key(cfg(torch.float16, "adam")) == (16, 16, 4, 2)
    assert key(cfg(torch.float16)) == key(cfg(torch.bfloat16)) == (16, 32, 4, 3)
    assert key(G.grads_config(128, (784, 128, 10), torch.float32, "update", "tf32")) == (16, 32, 4, 3)
    assert key(G.grads_config(128, (784, 128, 10), torch.float32, "update", "tf32", "adam")) == (16, 32, 4, 2)
    assert key(G.grads_config(16384, (784, 128, 10), torch.float32, "update")) == (16, 32, 4, 2)  # fp32 IEEE


def test_the_wide_update_tiles_per_dtype_and_optimizer():
    """Past WIDE_FROM rows (the compile report's rules): 128 columns and 16 warps, the epilogue in parts of
    EPILOGUE_N columns — whole tiles for SGD in 16-bit dtypes, 64 for SGD in TF32, 32 for Adam and for the
    accumulation (whole, they spill) —; and 16 columns, in one part, for layer inputs that are not multiples of
    16 wide (the course's 1000 → 100 and 20 → 13 → 8 spill at 64 and 128 columns), small batches and fp32 IEEE."""
    cfg = lambda widths, dtype, opt="sgd", epilogue="update", rows=16384, **kw: G.grads_config(  # noqa: E731
        rows, widths, dtype, epilogue, optimizer=opt, **kw)
    key = lambda c: (c["BLOCK_N"], c["EPILOGUE_N"], c["num_warps"])  # noqa: E731
    seed, f32, bf16 = (784, 128, 10), torch.float32, torch.bfloat16
    assert key(cfg(seed, bf16)) == key(cfg(seed, torch.float16)) == (128, 128, 16)
    assert key(cfg(seed, f32, precision="tf32")) == (128, 64, 16)
    assert key(cfg(seed, bf16, "adam")) == key(cfg(seed, f32, "adam", precision="tf32")) == (128, 32, 16)
    assert key(cfg(seed, bf16, epilogue="accumulate")) == key(cfg(seed, f32, epilogue="accumulate",
                                                                  precision="tf32")) == (128, 32, 16)
    for widths in ((1000, 100, 10), (784, 100, 10), (1000, 128, 10), (20, 13, 8, 3)):
        assert key(cfg(widths, bf16)) == key(cfg(widths, f32, "adam", precision="tf32")) == (16, 16, 4), widths
        assert cfg(widths, bf16, epilogue="accumulate")["BLOCK_N"] == 16, widths
    assert key(cfg((1008, 96, 10), bf16)) == (128, 128, 16)  # aligned: the output width does not count
    assert key(cfg(seed, f32, rows=128, precision="tf32")) == key(cfg(seed, f32)) == (16, 16, 4)
    assert key(G.grads_config(16384, seed, f32, "store", precision="tf32")) == (32, 32, 4)


def test_resident_programs_of_the_update_tiles():
    """One per SM for the train step's wide tiles (128 columns), two for the others (the compile report: 1 block
    per SM at 108–128 registers × 512 threads; 3–7 for 16-column update and accumulate tiles)."""
    wide = lambda dtype, epilogue, **kw: G.grads_config(16384, (784, 128, 10), dtype, epilogue, **kw)  # noqa: E731
    assert G.resident_programs(wide(torch.bfloat16, "update"), "update") == 1  # 128 columns, 16 warps
    assert G.resident_programs(wide(torch.float32, "update", precision="tf32"), "update") == 1  # 128 columns
    assert G.resident_programs(wide(torch.float32, "update"), "update") == 2  # fp32 IEEE: 16 columns
    assert G.resident_programs(wide(torch.bfloat16, "accumulate"), "accumulate") == 1
    assert G.resident_programs(wide(torch.bfloat16, "store"), "store") == 2
    assert G.resident_programs(G.grads_config(128, (784, 128, 10), torch.bfloat16, "update"), "update") == 2


def test_how_many_slices():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert G.split_count(128, 58, cuda, sm_count=132) == 1  # the seed step: no split
    assert G.split_count(1024, 58, cuda, sm_count=132) == 4  # 2·132 programs wanted, slices of at least 256 rows
    assert G.split_count(65536, 58, cuda, sm_count=132) == 16  # slices of at most 4096 rows
    assert G.split_count(65536, 229, cuda, sm_count=132) == 1  # hidden 1024: the tiles fill the GPU already
    assert G.split_count(1 << 22, 58, cuda, sm_count=132) == G.MAX_SPLIT
    assert G.split_count(65536, 58, cpu) == 1  # the interpreter: never (tests force it)
    # the train step's update and its loss program: no further wave for a few programs
    assert G.split_count(16384, 15, cuda, sm_count=132) == 18  # 271 programs: a module's backward fills more
    assert G.split_count(16384, 15, cuda, sm_count=132, whole_waves=True) == 17  # 256 of 2 · 132
    # the wide update tiles (128 columns, 16 warps): one program per SM, one wave
    assert G.split_count(16384, 15, cuda, sm_count=132, whole_waves=True, tensor_cores=True, resident=1) == 8
    assert G.split_count(16384, 8, cuda, sm_count=132, whole_waves=True, tensor_cores=True, resident=1) == 16
    assert G.split_count(16384, 8, cuda, sm_count=132, whole_waves=True, tensor_cores=True) == 32  # two waves
    assert G.split_count(65536, 8, cuda, sm_count=132, whole_waves=True, tensor_cores=True, resident=1) == 16
    # bf16 at hidden 1024 (64 tiles): one wave of slices of 32768 and 8192 rows, not 16 and 4 of at most 4096
    assert G.split_count(65536, 64, cuda, sm_count=132, whole_waves=True, tensor_cores=True, resident=1) == 2
    assert G.split_count(16384, 64, cuda, sm_count=132, whole_waves=True, tensor_cores=True, resident=1) == 2
    assert G.split_count(65536, 64, cuda, sm_count=132, whole_waves=True, tensor_cores=True) == 16  # 2 per SM
    # tiles filling half of the SMs in TF32 / 16-bit dtypes: one wave of 2 per SM, no more (the course's
    # regression at 16384 rows: 70 tiles, S = 3 — its reduction chain was 16384 rows long at S = 1)
    assert G.split_count(16384, 70, cuda, sm_count=132, whole_waves=True, tensor_cores=True) == 3
    assert G.split_count(16384, 120, cuda, sm_count=132, whole_waves=True, tensor_cores=True) == 2
    assert G.split_count(16384, 70, cuda, sm_count=132, whole_waves=True) == 4  # fp32 IEEE: slices of 4096
    assert G.split_count(16384, 132, cuda, sm_count=132, whole_waves=True, tensor_cores=True) == 1
    assert G.split_count(16384, 58, cuda, sm_count=108, whole_waves=True) == 4  # fp32 IEEE on an A100: FMA-bound
    assert G.split_count(16384, 104, cuda, sm_count=132) == 4  # a module's backward at 32 × 32 tiles
