"""bench.model's launch terms on synthetic compile results: the binding term, and what the splits change."""
import pytest

from bench import gpu_compile as gc
from bench import model
from bench.roofline import peak_for

PEAK = peak_for("NVIDIA H200")


def _grads(split, grid):
    cfg = dict(BLOCK_MS=(128, 16), BLOCK_N=16, BLOCK_K=32, BLOCK_R=64)
    return dict(config=cfg, grid=(grid,), blocks_per_sm=4, split=split)


def test_the_split_shortens_the_reduction_chain_of_a_starved_grid():
    case = gc.Case("step_grads", "sm_90", "bf16", True, 65536, 784, 128, 10)
    before = model.launch_terms("grads", case, _grads(1, 58), 132, PEAK, "bf16")
    after = model.launch_terms("grads", case, _grads(16, 58 * 16 + 1), 132, PEAK, "bf16")
    assert before["bound"] == "chain" and after["chain"] < before["chain"] / 4
    assert after["time"] < before["time"]
    assert after["L2"] > before["L2"]  # the partials' traffic


def test_the_hidden_split_shortens_the_chain_of_a_small_batch():
    """B = 128, hidden 1024: 8 row blocks, 8 slices of 128; G = 8 gives each program one slice, the last one
    also the 8 partials and the 8 slices' backward — more SMs, a chain of 14 + 8 + 8 steps instead of 8 · 15."""
    case = gc.Case("step_rows", "sm_90", "bf16", True, 128, 784, 1024, 10)
    cfg = dict(BLOCK_M=16, BLOCK_K=64, BLOCK_H=128, BLOCK_OUT=16)
    before = model.launch_terms("rows", case, dict(config=cfg, grid=(8,), blocks_per_sm=2), 132, PEAK, "bf16")
    after = model.launch_terms("rows", case, dict(config=cfg, grid=(64,), blocks_per_sm=2), 132, PEAK, "bf16")
    assert before["bound"] == "chain" and before["chain"] == pytest.approx(8 * 15 * model.STEP_NS * 1e-3)
    assert after["chain"] == pytest.approx(30 * model.STEP_NS * 1e-3) and after["time"] < before["time"]
    assert after["L2"] > before["L2"]  # x read by each group, the partials, the other groups' activations


def test_a_launch_is_never_faster_than_its_launch_cost():
    case = gc.Case("step_rows", "sm_90", "fp32", True, 1, 784, 128, 10)
    terms = model.launch_terms("rows", case, dict(config=dict(BLOCK_M=16, BLOCK_K=16, BLOCK_H=128), grid=(1,),
                                                  blocks_per_sm=2), 132, PEAK, "fp32")
    assert terms["time"] >= model.LAUNCH_US and terms["bound"] in ("math", "chain", "L2", "HBM")


def test_the_row_partials_take_the_last_layer_off_launch_2(monkeypatch):
    """bf16 at 65536 rows, hidden 1024 (128-row tiles, R = 512): launch 1 writes 512 partials of 10 × 1025
    float32 instead of dz, launch 2 reads them instead of the activations and dz, and sums them in steps of
    PARTS_PER_STEP partials."""
    from pyfused.kernels.grads import PARTS_PER_STEP

    rows_case = gc.Case("step_rows", "sm_90", "bf16", True, 65536, 784, 1024, 10)
    grads_case = gc.Case("step_grads", "sm_90", "bf16", True, 65536, 784, 1024, 10)
    assert model._row_partials(grads_case) == (True, 512)
    rows_res = dict(config=dict(BLOCK_M=128, BLOCK_K=64, BLOCK_H=128, BLOCK_OUT=16), grid=(512,), blocks_per_sm=1)
    grads_res = dict(config=dict(BLOCK_MS=(128, 16), BLOCK_N=128, BLOCK_K=32, BLOCK_R=256), grid=(121,),
                     blocks_per_sm=1, split=2)
    ours = [model.launch_terms(k, c, r, 132, PEAK, "bf16") for k, c, r in
            (("rows", rows_case, rows_res), ("grads", grads_case, grads_res))]
    monkeypatch.setattr(model, "_row_partials", lambda case: (False, 512))
    plain = [model.launch_terms(k, c, r, 132, PEAK, "bf16") for k, c, r in
             (("rows", rows_case, rows_res), ("grads", grads_case, dict(grads_res, grid=(129,))))]
    parts, dz = 4 * 512 * 10 * 1025, 2 * 65536 * 10
    assert ours[0]["HBM"] - plain[0]["HBM"] == pytest.approx((parts - dz) / PEAK.bandwidth * 1e6)
    assert ours[1]["HBM"] - plain[1]["HBM"] == pytest.approx((parts - dz - 2 * 65536 * 1024) / PEAK.bandwidth * 1e6)
    assert ours[1]["L2"] < plain[1]["L2"]
    assert ours[1]["chain"] >= -(-512 // PARTS_PER_STEP) * model.STEP_NS * 1e-3


def test_a_tile_summed_in_parts_goes_through_the_partials_at_s_1():
    """TF32's 128-column update tiles (EPILOGUE_N 64) write their one partial and read it back even unsplit:
    2 · 4 bytes per parameter more through L2 and one more step in the chain than whole tiles."""
    case = gc.Case("step_grads", "sm_90", "tf32", True, 16384, 784, 1024, 10)
    cfg = dict(BLOCK_MS=(128, 16), BLOCK_N=128, BLOCK_K=32, BLOCK_R=256)
    whole, parts = (model.launch_terms("grads", case, dict(config=c, grid=(65,), blocks_per_sm=1, split=1), 132,
                                       PEAK, "tf32") for c in (dict(cfg, EPILOGUE_N=128), dict(cfg, EPILOGUE_N=64)))
    params = 784 * 1024 + 1024 + 1024 * 10 + 10
    assert parts["L2"] - whole["L2"] == pytest.approx(2 * 4 * params / (model.L2_TBPS * 1e12) * 1e6)
    assert parts["chain"] - whole["chain"] == pytest.approx(model.STEP_NS * 1e-3)


@pytest.mark.slow
def test_the_split_is_never_predicted_slower():
    rows = model.model("h200")
    by_key = {(r["B"], r["hidden"], r["mode"], r["version"]): r for r in rows}
    for (B, h, mode, version), r in by_key.items():
        assert r["step_us"] >= r["floor_us"] - 1e-9, (B, h, mode, version)  # no tiles beat the floor
        if version == "after":
            assert r["step_us"] <= by_key[(B, h, mode, "before")]["step_us"] + 1e-9, (B, h, mode)


def test_the_two_launch_floor_reads_x_twice_where_it_does_not_fit_in_l2():
    """bf16, hidden 128: at 65536 rows x (103 MB) is read from HBM by both launches, so no two-launch step comes
    within 1.5× of the roofline (which reads it once); at 16384 rows (26 MB) launch 2 finds it in L2."""
    x_us = lambda B: 2 * B * model.N_IN / PEAK.bandwidth * 1e6  # noqa: E731
    big = model.two_launch_floor(65536, 128, "bf16", PEAK, model.L2_MB["h200"])
    assert big >= 2 * x_us(65536) + 2 * model.LAUNCH_US
    assert big > 1.5 * model.work_roofline(65536, 128, "bf16", PEAK)
    assert big == model.two_launch_floor(65536, 128, "bf16", PEAK, 0)
    small = model.two_launch_floor(16384, 128, "bf16", PEAK, model.L2_MB["h200"])
    assert 0 < model.two_launch_floor(16384, 128, "bf16", PEAK, 0) - small <= x_us(16384)


def test_committed_predictions_are_read_for_the_gpu_check():
    """gpu_check puts the committed predictions beside its measurements: the H200 table's "after" rows, by
    (B, hidden, mode); nothing for other devices."""
    rows = model.committed("NVIDIA H200")
    assert set(rows) >= {(b, h, m) for b in (128, 4096, 16384, 65536) for h in (128, 1024)
                         for m in ("fp32", "tf32", "bf16")}
    launch1, launch2, step = rows[(128, 128, "bf16")]
    assert 0 < launch1 < step and 0 < launch2 < step and abs(launch1 + launch2 - step) < 0.11
    assert model.committed("CPU (x86_64)") == {} and model.committed("NVIDIA A100-SXM4-80GB") == {}
    assert len(rows) == len(model.BATCHES) * len(model.HIDDEN) * len(model.MODES)  # not the course table's rows


def test_committed_course_predictions_are_read_for_the_gpu_check():
    """The course table's step predictions, by (program, optimizer, B, mode): every course step bench.model
    prices, at its own batch and at COURSE_LARGE_ROWS."""
    rows = model.committed_course("NVIDIA H200")
    assert set(rows) == {(r[0], r[2], r[4].n_rows, r[3]) for r in model._course_cases("sm_90")}
    assert all(v > 0 for v in rows.values())
    assert model.committed_course("CPU (x86_64)") == {}


def _rows(case, cfg, grid, mode):
    return model.launch_terms("rows", case, dict(config=cfg, grid=(grid,), blocks_per_sm=1), 132, PEAK, mode)


def test_launch_1_reads_its_row_tile_again_for_every_hidden_slice():
    """Each hidden slice's K loop reloads the program's x tile (cp.async.cg: from L2, past L1): TF32 at 65536
    rows, hidden 1024, 128-row tiles — slices of 64 read x 16 times, slices of 128 8 times; the weights' reads
    (once per row block) do not change."""
    case = gc.Case("step_rows", "sm_90", "tf32", True, 65536, 784, 1024, 10)
    narrow, wide = (_rows(case, dict(BLOCK_M=128, BLOCK_K=32, BLOCK_H=h, BLOCK_OUT=16), 512, "tf32") for h in (64, 128))
    assert narrow["L2"] - wide["L2"] == pytest.approx(4 * 65536 * 784 * (16 - 8) / (model.L2_TBPS * 1e12) * 1e6)
    assert narrow["bound"] == "L2"


def test_the_mse_head_reads_float_targets(monkeypatch):
    """MSE's targets are B × n_out values of the dtype, NLL's B int64 class indices: launch 1's HBM bytes differ
    by exactly that (the same tiles, no row partials)."""
    monkeypatch.setattr(model, "_row_partials", lambda case: (False, 1024))
    cfg = dict(BLOCK_M=16, BLOCK_K=64, BLOCK_H=128, BLOCK_OUT=16)
    nll, mse = (_rows(gc.Case(k, "sm_90", "bf16", True, 16384, 1000, 100, 10), cfg, 1024, "bf16")
                for k in ("step_rows", "step_rows_mse"))
    assert mse["HBM"] - nll["HBM"] == pytest.approx((2 * 16384 * 10 - 8 * 16384) / PEAK.bandwidth * 1e6)


def test_adam_reads_and_writes_two_state_tensors():
    """Launch 2 with Adam moves one more state tensor of P elements in and out than momentum SGD."""
    cfg = dict(BLOCK_MS=(128, 16), BLOCK_N=16, BLOCK_K=32, BLOCK_R=64)
    sgd, adam = (model.launch_terms("grads", gc.Case(k, "sm_90", "tf32", True, 16384, 1000, 100, 10),
                                    dict(config=cfg, grid=(211,), blocks_per_sm=2, split=3), 132, PEAK, "tf32")
                 for k in ("step_grads", "step_grads_adam"))
    params = 1000 * 100 + 100 + 100 * 10 + 10
    assert adam["HBM"] - sgd["HBM"] == pytest.approx(4 * 2 * params / PEAK.bandwidth * 1e6)
    assert adam["L2"] == sgd["L2"] and adam["chain"] == sgd["chain"]


def test_a_third_layer_adds_its_products_and_its_backward(monkeypatch):
    """784 → 128 → 128 → 10: launch 1's FLOPs are every layer's forward product and the hidden gradients of every
    layer but the first; its chain adds the second layer's forward and backward K loops; launch 2 reduces all
    three layers' weight gradients."""
    monkeypatch.setattr(model, "_row_partials", lambda case: (False, 8))
    cfg = dict(BLOCK_M=16, BLOCK_K=64, BLOCK_H=128, BLOCK_OUT=16)
    two = _rows(gc.Case("step_rows", "sm_90", "bf16", True, 128, 784, 128, 10), cfg, 8, "bf16")
    three = _rows(gc.Case("step_rows", "sm_90", "bf16", True, 128, 784, 128, 10, extra_hidden=(128,)), cfg, 8,
                  "bf16")
    flops = 2 * 128 * (784 * 128 + 2 * 128 * 128 + 2 * 128 * 10)
    assert three["math"] == pytest.approx(flops / PEAK.flops["bf16"] * 132 / 8 * 1e6)  # 8 programs
    # the last hidden layer's loop over 128 inputs (2 + 2 steps), the first layer's forward (13 + 1) and the
    # second's backward into it (2 + 1), against the two-layer net's one loop over x (13 + 2)
    assert three["chain"] - two["chain"] == pytest.approx((4 + 14 + 3 - 15) * model.STEP_NS * 1e-3)
    grads = dict(config=dict(BLOCK_MS=(128, 128, 16), BLOCK_N=16, BLOCK_K=32, BLOCK_R=64), grid=(100,),
                 blocks_per_sm=2, split=1)
    g3 = model.launch_terms("grads", gc.Case("step_grads", "sm_90", "bf16", True, 128, 784, 128, 10,
                                             extra_hidden=(128,)), grads, 132, PEAK, "bf16")
    assert g3["math"] == pytest.approx(2 * 128 * (784 * 128 + 128 * 128 + 128 * 10) / PEAK.flops["bf16"]
                                       * 132 / 100 * 1e6)


def test_the_course_table_covers_every_course_program():
    """bench.model's course table: every program of bench.gpu_compile.COURSE (the regression with SGD and with
    Adam) at its own batch and at COURSE_LARGE_ROWS, each mode, with kernels the program runs."""
    table = model._course_cases("sm_90")
    assert {row[0] for row in table} == set(gc.COURSE)
    assert {(row[0], row[2]) for row in table if row[0].startswith("regression")} == {
        (next(p for p in gc.COURSE if p.startswith("regression")), o) for o in ("sgd", "adam")}
    for program, loss, optimizer, mode, c_rows, c_grads in table:
        kernels = gc.COURSE[program][1]
        assert c_rows.kernel in kernels and c_grads.kernel in kernels
        assert (c_rows.kernel == "step_rows_mse") == (loss == "mse")
        assert (c_grads.kernel == "step_grads_adam") == (optimizer == "adam")
    assert {(r[0], r[2], r[4].n_rows, r[3]) for r in table} == {
        (p, o, B, m) for p, _, _, _, o in [(s[0], 0, 0, 0, s[4]) for s in model.COURSE_STEPS]
        for B in (gc.COURSE[p][0][0], gc.COURSE_LARGE_ROWS) for m in model.MODES}


def test_another_sweep_prints_its_rows_and_writes_nothing(monkeypatch, capsys, tmp_path):
    """``--batches/--hidden/--modes`` price those points with the launchers' own configs and grids (compiled
    resources stood in for: one block per SM) and print the first table's rows; the results are not written."""
    def compiled(cases):
        out = {}
        for case in cases:
            launch = gc.capture(case)
            config = {k: v for k, v in launch.kwargs.items() if isinstance(v, (bool, int, str))
                      or (isinstance(v, tuple) and all(isinstance(e, int) for e in v))}
            out[case] = dict(config=config, grid=list(launch.grid), blocks_per_sm=1)
        return out

    monkeypatch.setattr(model.gc, "compile_cases", compiled)
    monkeypatch.setattr(model, "write", lambda *args: pytest.fail("a sweep wrote the results"))
    model.main(["--device", "h200", "--batches", "2048", "--hidden", "128", "256", "--modes", "tf32"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[:4] for line in lines] == [
        ["| 2048", str(h), "tf32", version] for h in (128, 256) for version in ("before", "after")]
    assert lines[1].split(" | ")[4] == "4 / 2"  # TF32's 128-row tiles at 2048 rows, hidden 128: G = 2
    with pytest.raises(SystemExit):  # --out says where to write: not with a sweep
        model.main(["--batches", "2048", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
