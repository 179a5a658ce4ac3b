"""The hidden-layer split of the row kernel (G programs per row block share a two-layer net's hidden layer; the
last to arrive sums the logit partials in group order): every output of the train step's row pass and of a
module's forward against float64, bit identical from run to run, the grid and the counters; FusedTrainStep with
a split against the eager loop; and how G is chosen."""
import pytest
import torch
import triton

import pyfused
from pyfused import torch_ops
from pyfused.kernels import rows as R
from pyfused.kernels.launch import COUNTERS, observe
from utils import (DEVICE, OPTIMIZERS, STEP_TOL, TOL, batches, eager_loss, eager_twin, params_and_states_match,
                   step_and_eager, steps_match_eager)

B, N_IN, HIDDEN, N_OUT = 40, 24, 100, 5  # hidden 100: 7 slices of 16, the last one ragged
CONFIG = dict(BLOCK_M=16, BLOCK_K=16, BLOCK_H=16, BLOCK_OUT=16, num_warps=4, num_stages=2)
IGNORE = -100


def _net(dtype, bias, seed=0, n_in=N_IN, hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x, w1, w2 = r(B, n_in), r(hidden, n_in) / 5, r(N_OUT, hidden) / 5
    biases = [r(hidden), r(N_OUT)] if bias else [None, None]
    classes = torch.randint(0, N_OUT, (B,), generator=g)
    classes[::7] = IGNORE
    to = lambda t: None if t is None else t.to(DEVICE, dtype)  # noqa: E731
    return to(x), [to(w1), to(w2)], [to(b) for b in biases], classes.to(DEVICE), r(B, N_OUT).to(DEVICE, dtype)


def _exact(x, weights, biases, activation, loss, classes, target, block_m=CONFIG["BLOCK_M"]):
    """Float64 outputs of the row pass (:func:`pyfused.torch_ops.row_pass`), the hidden layer's as tensors."""
    ref = torch_ops.row_pass(x.double(), [w.double() for w in weights],
                             [None if b is None else b.double() for b in biases], (activation,), loss,
                             classes if loss == "class" else target.double(), block_m, IGNORE)
    return dict(ref, acts=ref["acts"][0], dpres=ref["dpres"][0])


def _rows(x, weights, biases, activation, loss, classes, target, split, mode, config=CONFIG, partials=False):
    """One launch of the row kernel with G = ``split``: "step" (forward, loss and backward rows, as the train
    step) or "forward" (a module's forward: activations and the head's output), with ``config``'s tiles."""
    new = lambda *s: torch.empty(s, dtype=x.dtype, device=x.device)  # noqa: E731
    acc = torch.promote_types(x.dtype, torch.float32)
    hidden = weights[0].shape[0]
    outs = dict(acts=new(B, hidden))
    kwargs = dict(head="log_softmax" if loss == "class" else "logits", split=split, config=config)
    if mode == "step":
        outs.update(dpres=new(B, hidden), dz=new(B, N_OUT),
                    stats=torch.empty(triton.cdiv(B, config["BLOCK_M"]), 2, dtype=acc, device=x.device))
        kwargs.update(loss=loss, target=classes if loss == "class" else target, dpres=[outs["dpres"]],
                      dz=outs["dz"], stats=outs["stats"])
        if partials:  # NaN where nothing is written (no bias: the sums)
            outs["partials"] = torch.full((triton.cdiv(B, config["BLOCK_M"]), N_OUT * (hidden + 1)), float("nan"),
                                          dtype=acc, device=x.device)
            kwargs["row_partials"] = outs["partials"]
    else:
        outs["out"] = new(B, N_OUT)
        kwargs["out"] = outs["out"]
    seen = []
    with observe(seen.append):
        R.rows(x, weights, biases, (activation,), acts=[outs["acts"]], **kwargs)
    return outs, seen


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv("PYFUSED_BACKEND", "triton")


@pytest.mark.parametrize("mode", ["step", "forward"])
@pytest.mark.parametrize("split", [2, 3, 7])
@pytest.mark.parametrize("loss,activation,bias", [("class", "relu", True), ("class", "sigmoid", False),
                                                  ("mse", "relu", False), ("mse", "sigmoid", True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_split_row_pass_matches_float64_and_repeats_bit_for_bit(kernels, dtype, loss, activation, bias, split,
                                                                mode):
    net = _net(dtype, bias)
    ours, seen = _rows(*net[:3], activation, loss, *net[3:], split, mode)
    exact = _exact(*net[:3], activation, loss, *net[3:])
    for name, value in ours.items():
        torch.testing.assert_close(value.double(), exact[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")
    again, _ = _rows(*net[:3], activation, loss, *net[3:], split, mode)
    assert all(torch.equal(ours[name], again[name]) for name in ours)
    groups = triton.cdiv(HIDDEN, triton.cdiv(triton.cdiv(HIDDEN, CONFIG["BLOCK_H"]), split) * CONFIG["BLOCK_H"])
    assert seen[0].grid == (triton.cdiv(B, CONFIG["BLOCK_M"]) * groups,) and seen[0].kwargs["HSPLIT"]
    counters = [c for (kernel, device, _), c in COUNTERS.items() if kernel == "rows" and device == net[0].device]
    assert counters and all(int(c.abs().sum()) == 0 for c in counters)  # every launch leaves them at 0


@pytest.mark.parametrize("n_in,hidden", [(N_IN, HIDDEN), (64, 128), (80, 96)])
@pytest.mark.parametrize("loss,activation,bias", [("class", "relu", True), ("mse", "sigmoid", False)])
def test_the_float32_split_tiles_match_float64(kernels, loss, activation, bias, n_in, hidden):
    """The train step's tiles for a hidden layer of 65-128 features in fp32 IEEE at small B — unaligned (the
    course's regression, 1000 → 100 → 10 at 64 rows; here 40 × 24 → 100 → 5) or aligned with an aligned input
    of at least 64 (the seed, 784 → 128 → 10 at 128 rows; here 64 → 128 and 80 → 96): two slices of 64 (the
    last ragged but at 128), K steps of 32, 3 stages — what rows_config gives — split in G = 2: every output
    against float64, bit identical twice."""
    config = R.rows_config(B, (n_in, hidden, N_OUT), torch.float32, forward=True, backward=True, loss=loss)
    assert (config["BLOCK_H"], config["BLOCK_K"], config["num_stages"]) == (64, 32, 3)
    net = _net(torch.float32, bias, n_in=n_in, hidden=hidden)
    ours, seen = _rows(*net[:3], activation, loss, *net[3:], 2, "step", config)
    exact = _exact(*net[:3], activation, loss, *net[3:])
    assert seen[0].kwargs["HSPLIT"] and seen[0].grid == (triton.cdiv(B, 16) * 2,)
    for name, value in ours.items():
        torch.testing.assert_close(value.double(), exact[name], **TOL[torch.float32], msg=lambda m: f"{name}: {m}")
    again, _ = _rows(*net[:3], activation, loss, *net[3:], 2, "step", config)
    assert all(torch.equal(ours[name], again[name]) for name in ours)


def test_the_course_regression_takes_two_slices_at_small_batches():
    """fp32 IEEE, 1000 → 100 → 10: slices of 64 up to SPLIT_UNALIGNED_ROWS rows (the hidden split then gives
    twice the SMs: launch 1 9.8 → 6.4 µs predicted at 64 rows on an H200), one slice of 128 past them, in TF32
    (which spilled), for three layers and for module forwards."""
    f32 = torch.float32
    cfg = lambda rows, widths=(1000, 100, 10), precision="ieee", backward=True: R.rows_config(  # noqa: E731
        rows, widths, f32, forward=True, backward=backward, precision=precision)
    assert (cfg(64)["BLOCK_H"], cfg(R.SPLIT_UNALIGNED_ROWS)["BLOCK_H"], cfg(R.SPLIT_UNALIGNED_ROWS + 1)["BLOCK_H"]) \
        == (64, 64, 128)
    assert cfg(64, precision="tf32")["BLOCK_H"] == 128
    assert cfg(64, (20, 13, 8, 3))["BLOCK_H"] == 16 and cfg(64, backward=False)["BLOCK_H"] == 32
    cuda = torch.device("cuda")
    assert R.hidden_split(4, 2, cuda, sm_count=132, tensor_cores=False) == 2  # 64 rows: 4 blocks, G = 2


def test_the_seed_takes_two_slices_up_to_1024_rows():
    """fp32 IEEE, 784 → 128 → 10 (the seed): slices of 64, K steps of 32, 3 stages up to SPLIT_ALIGNED_ROWS
    rows — where the 16-row blocks leave half of an H200's SMs idle, so the hidden split gives G = 2 (at 128 rows
    launch 1 8.5 → 5.6 µs, the step 11.4 → 8.5 predicted; at 1024 rows 14.1 → 11.2) —; one slice of 128 past
    them, in TF32 and 16-bit dtypes (chain-bound: the split's extra steps would cost), for inputs that are not
    whole 16-wide tiles of at least 64 (20, 1000 and 16 inputs spilled 4–12 B with Triton 3.6), past 16
    outputs, for three layers and for module forwards."""
    cfg = lambda rows, widths=(784, 128, 10), dtype=torch.float32, precision="ieee", backward=True: (  # noqa: E731
        R.rows_config(rows, widths, dtype, forward=True, backward=backward, precision=precision))
    assert R.SPLIT_ALIGNED_ROWS == 1024
    split = dict(BLOCK_M=16, BLOCK_K=32, BLOCK_H=64, BLOCK_OUT=16, num_warps=8, num_stages=3)
    assert cfg(1) == cfg(128) == cfg(R.SPLIT_ALIGNED_ROWS) == cfg(128, (64, 80, 16)) == split
    assert cfg(R.SPLIT_ALIGNED_ROWS + 1)["BLOCK_H"] == 128
    for other in (dict(precision="tf32"), dict(dtype=torch.bfloat16), dict(widths=(1000, 128, 10)),
                  dict(widths=(48, 128, 10)), dict(widths=(20, 128, 10)), dict(widths=(784, 128, 32)),
                  dict(widths=(784, 128, 128, 10)), dict(backward=False)):
        assert cfg(128, **other)["BLOCK_H"] != 64 or cfg(128, **other)["BLOCK_K"] != 32, other
    cuda = torch.device("cuda")
    n_slices = triton.cdiv(128, split["BLOCK_H"])
    assert R.hidden_split(128 // 16, n_slices, cuda, sm_count=132, tensor_cores=False) == 2
    assert R.hidden_split(R.SPLIT_ALIGNED_ROWS // 16, n_slices, cuda, sm_count=132, tensor_cores=False) == 2


@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_batch_row_tiles_match_float64(kernels, dtype, block_m):
    """The large-batch tiles of the train step's row pass (64 rows; 128 in 16-bit dtypes), here over 40 rows —
    one ragged block —, 8 warps, unsplit: every output against float64."""
    config = dict(CONFIG, BLOCK_M=block_m, BLOCK_K=32, BLOCK_H=64, num_warps=8)
    net = _net(dtype, True)
    ours, seen = _rows(*net[:3], "relu", "class", *net[3:], 1, "step", config)
    exact = _exact(*net[:3], "relu", "class", *net[3:], block_m)
    assert seen[0].grid == (1,) and seen[0].kwargs["BLOCK_M"] == block_m
    for name, value in ours.items():
        torch.testing.assert_close(value.double(), exact[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_last_layer_row_partials_match_float64(kernels, dtype, bias, block_m, split):
    """The row pass's per-row-block partials of the last layer's dW and db (``row_partials``; 40 rows: 3 blocks
    of 16 or one ragged block of 64, unsplit and with G = 3), against float64 (:func:`torch_ops.row_partials`),
    bit for bit from run to run; then the weight-gradient launch summing them gives dW₂ and db₂, against
    float64 too, without reading dz or the hidden activations (NaN there)."""
    from pyfused.kernels import grads as G

    config = dict(CONFIG, BLOCK_M=block_m, num_warps=8 if block_m == 64 else 4)
    net = _net(dtype, bias)
    x, weights, biases = net[:3]
    ours, seen = _rows(x, weights, biases, "relu", "class", *net[3:], split, "step", config, partials=True)
    exact = _exact(x, weights, biases, "relu", "class", *net[3:], block_m)
    want = torch_ops.row_partials(exact["dz"], exact["acts"], block_m, bias)
    n_w = N_OUT * HIDDEN
    assert seen[0].kwargs["ROW_PARTIALS"] and seen[0].kwargs["HSPLIT"] == (split > 1)
    for name in ("acts", "dpres", "dz", "stats"):
        torch.testing.assert_close(ours[name].double(), exact[name], **TOL[dtype], msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(ours["partials"][:, :n_w].double(), want[:, :n_w], **TOL[dtype])
    if bias:
        torch.testing.assert_close(ours["partials"][:, n_w:].double(), want[:, n_w:], **TOL[dtype])
    else:
        assert ours["partials"][:, n_w:].isnan().all()  # not written
    again, _ = _rows(x, weights, biases, "relu", "class", *net[3:], split, "step", config, partials=True)
    assert all(torch.equal(ours[n], again[n]) for n in ("acts", "dpres", "dz", "stats")) and torch.equal(
        ours["partials"][:, :n_w], again["partials"][:, :n_w])
    out = [torch.empty_like(p) if p is not None else None for pair in zip(weights, biases) for p in pair]
    nan = torch.full_like(ours["dz"], float("nan"))
    G.grads(x, weights, [torch.full_like(ours["acts"], float("nan"))], [ours["dpres"], nan], need=(True, True),
            has_bias=(bias, bias), grads=out, row_partials=ours["partials"])
    dz, acts = exact["dz"], exact["acts"]
    torch.testing.assert_close(out[2].double(), dz.T @ acts, **TOL[dtype])
    torch.testing.assert_close(out[0].double(), exact["dpres"].T @ x.double(), **TOL[dtype])
    if bias:
        torch.testing.assert_close(out[3].double(), dz.sum(0), **TOL[dtype])
        torch.testing.assert_close(out[1].double(), exact["dpres"].sum(0), **TOL[dtype])


def test_no_split_without_a_forward_or_with_more_layers_or_a_single_slice(kernels):
    net = _net(torch.float64, True)
    x, (w1, w2), (b1, b2) = net[0], net[1], net[2]
    acts = [_exact(*net[:3], "relu", "class", *net[3:])["acts"].to(x.dtype)]
    dz = torch.randn(B, N_OUT, dtype=x.dtype, device=x.device)
    seen = []
    with observe(seen.append):  # a module's backward rows: no forward, nothing to split
        R.rows(x, [w1, w2], [None, None], ("relu",), acts=acts, dpres=[x.new_empty(B, HIDDEN)],
               dz=x.new_empty(B, N_OUT), forward=False, grad_in="dlogits", g=dz,
               scale=torch.ones((), dtype=x.dtype, device=x.device), split=3, config=CONFIG)
        R.rows(x, [w1, w2], [b1, b2], ("relu",), acts=[x.new_empty(B, HIDDEN)], out=x.new_empty(B, N_OUT),
               split=3, config=dict(CONFIG, BLOCK_H=128))  # one slice of 128: one group
        empty = x.new_empty(B, N_OUT)  # no hidden feature: log_softmax(b2) in every row
        R.rows(x, [w1[:0], w2[:, :0]], [None, b2], ("relu",), acts=[x.new_empty(B, 0)], out=empty, split=3,
               config=CONFIG)
    assert [s.grid for s in seen] == [(3,)] * 3 and not any(s.kwargs["HSPLIT"] for s in seen)
    torch.testing.assert_close(empty, torch.log_softmax(b2, 0).expand(B, N_OUT))
    w_mid = torch.randn(HIDDEN, HIDDEN, dtype=x.dtype, device=x.device) / 10
    acts = [x.new_empty(B, HIDDEN), x.new_empty(B, HIDDEN)]
    seen = []
    with observe(seen.append):  # three layers: the first hidden layer is the whole block's input: not split
        R.rows(x, [w1, w_mid, w2], [b1, None, b2], ("relu", "relu"), acts=acts, out=x.new_empty(B, N_OUT),
               split=3, config=CONFIG)
    assert seen[0].grid == (3,) and not seen[0].kwargs["HSPLIT"]


@pytest.mark.parametrize("loss,optimizer", [("nll", "sgd"), ("mse", "adam")])
def test_train_step_with_a_hidden_split_matches_the_eager_loop(kernels, monkeypatch, loss, optimizer):
    monkeypatch.setattr(R, "hidden_split", lambda *args, **kwargs: 2)
    torch.manual_seed(0)
    model = pyfused.DeepFusedMLP(9, 200, 4, device=DEVICE, log_softmax=loss == "nll")  # 2 slices of 128
    ref = eager_twin(model)
    fused_cls, torch_cls, options = OPTIMIZERS[optimizer]
    opt, ref_opt = fused_cls(model.parameters(), **options), torch_cls(ref.parameters(), **options)
    step = pyfused.FusedTrainStep(model, opt, loss=loss)
    seen = []
    with observe(seen.append):
        for x, t in batches(loss, 40, 9, 4, 3):
            ours = step(x, t)
            theirs = eager_loss(loss, ref(x), t)
            theirs.backward()
            ref_opt.step()
            ref_opt.zero_grad()
            torch.testing.assert_close(ours, theirs.detach(), **STEP_TOL)
    assert [s.kwargs["HSPLIT"] for s in seen if s.name == "rows_kernel"] == [True] * 3
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **STEP_TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("features,bias", [((9, 20, 4), True), ((9, 13, 8, 3), (False, False, True))])
@pytest.mark.parametrize("loss,optimizer", [("nll", "sgd"), ("mse", "adam")])
def test_train_step_with_row_partials_matches_the_eager_loop(kernels, monkeypatch, loss, optimizer, features, bias,
                                                              k):
    """FusedTrainStep with the last layer's gradient made per row block in launch 1 (forced here at 16-row
    tiles; the launchers take it with the large-batch tiles) against the eager loop: SGD with momentum and Adam,
    two and three layers (the course's 20 → 13 → 8 → 3 layout: bias on the output only), one update per batch
    and accumulation over 2; launch 1 stores no dz then."""
    monkeypatch.setattr(R, "row_partials_pay", lambda *args, **kwargs: True)
    torch.manual_seed(0)
    model = pyfused.DeepFusedMLP(*features, bias=bias, device=DEVICE, log_softmax=loss == "nll")
    step, opt, ref, ref_opt = step_and_eager(model, optimizer, loss, k)
    seen = []
    with observe(seen.append):
        steps_match_eager(step, ref, ref_opt, loss, batches(loss, 40, 9, features[-1], 4, 3), k)
    launches = [s for s in seen if s.name in ("rows_kernel", "grads_kernel")]
    assert len(launches) == 8 and all(s.kwargs["ROW_PARTIALS"] for s in launches)
    assert not any(s.kwargs["STORE_DZ"] for s in launches if s.name == "rows_kernel")
    params_and_states_match(model, opt, ref, ref_opt)


def test_row_partials_only_with_the_large_batch_tiles():
    bf16, f32 = torch.bfloat16, torch.float32
    assert R.row_partials_pay(65536, (784, 1024, 10), bf16)  # 128 rows: 80 B of partials for 256 B of activations
    assert R.row_partials_pay(16384, (784, 128, 10), f32, "tf32")  # 128 rows of 4 bytes
    assert R.row_partials_pay(16384, (784, 128, 16), bf16)
    assert not R.row_partials_pay(16384, (784, 128, 32), bf16)  # 256 B of partials: no gain
    assert not R.row_partials_pay(16384, (784, 128, 10), f32)  # fp32 IEEE: 16-row tiles
    assert not R.row_partials_pay(128, (784, 128, 10), bf16)  # B = 128: 16-row tiles
    assert not R.row_partials_pay(16384, (784, 1024, 512), bf16)  # past 256 outputs: 16-row tiles


def test_large_batch_row_tiles_only_for_aligned_widths():
    """The train step's large-batch row tiles need hidden widths of whole 16-wide tiles (the course's hidden 100
    spills at 64 rows: it keeps 16), and the 128-row ones an input width that is one too (the course's 1000 inputs
    spill at 128 rows) and at most 128 outputs, 32 in TF32; a module's forward keeps its 64-row tiles."""
    tiles = lambda widths, dtype=torch.bfloat16, backward=True: R.rows_config(  # noqa: E731
        16384, widths, dtype, forward=True, backward=backward)["BLOCK_M"]
    assert tiles((784, 128, 10)) == 128 and tiles((1000, 128, 10)) == 64
    assert tiles((784, 128, 10), torch.float32) == 16  # fp32 IEEE
    tf32 = lambda widths: R.rows_config(16384, widths, torch.float32, forward=True, backward=True,  # noqa: E731
                                        precision="tf32")
    assert (tf32((784, 1024, 10))["BLOCK_M"], tf32((784, 1024, 10))["BLOCK_H"]) == (128, 64)  # TF32: slices of 64
    assert (tf32((784, 128, 32))["BLOCK_M"], tf32((784, 128, 64))["BLOCK_M"]) == (128, 64)  # to 32 outputs
    assert tiles((784, 100, 10)) == tiles((1000, 100, 10)) == tiles((20, 13, 8, 3)) == 16
    assert R.rows_config(16384, (1000, 100, 10), torch.float32, forward=True, backward=True,
                         precision="tf32")["BLOCK_M"] == 16
    assert tiles((1000, 100, 10), backward=False) == 64
    assert not R.row_partials_pay(16384, (1000, 100, 10), torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 128, 4097, 16384])
@pytest.mark.parametrize("widths", [(784, 16, 10), (784, 128, 10), (784, 128, 128), (784, 128, 1024),
                                    (1000, 100, 10), (20, 13, 8, 3), (784, 1024, 10), (784, 128, 128, 10)],
                         ids=str)
@pytest.mark.parametrize("dtype, precision", [(torch.float32, "ieee"), (torch.float32, "tf32"),
                                              (torch.bfloat16, "ieee"), (torch.float64, "ieee")], ids=str)
def test_the_mse_head_changes_warps_k_steps_and_stages_only(rows, widths, dtype, precision):
    """With ``loss="mse"`` the row kernel keeps the tiles (row blocks, hidden slices, so the hidden split and the
    row partials) and changes warps, K steps and stages only where the squared error's target tile spilled
    (tests/test_gpu_compile.py compiles those cases)."""
    if widths[-1] > R.max_out(dtype):
        pytest.skip("wider than the row kernel takes in this dtype")
    for forward, backward in ((True, True), (True, False)):
        cfg = lambda loss: R.rows_config(rows, widths, dtype, forward=forward, backward=backward,  # noqa: E731
                                         precision=precision, loss=loss)
        ours, theirs = cfg("mse"), cfg("class")
        assert cfg("none") == theirs
        tunable = ("num_warps", "BLOCK_K", "num_stages")
        assert {k: v for k, v in ours.items() if k not in tunable} == \
            {k: v for k, v in theirs.items() if k not in tunable}
        if not backward:  # a module forward: fp32 IEEE 8 warps; TF32 and float64 2 stages; TF32's large-batch
            # tiles K steps of 16; 16-bit dtypes the class head's configuration
            fp32_ieee, tf32 = dtype == torch.float32 and precision == "ieee", precision == "tf32"
            assert ours["num_warps"] == (8 if fp32_ieee else theirs["num_warps"])
            assert ours["num_stages"] == (2 if tf32 or dtype == torch.float64 else theirs["num_stages"])
            large_tf32 = tf32 and ours["BLOCK_M"] > 32
            assert ours["BLOCK_K"] == (min(theirs["BLOCK_K"], 16) if large_tf32 else theirs["BLOCK_K"])
            if dtype.itemsize == 2:
                assert ours == theirs
            continue
        assert ours["num_stages"] == theirs["num_stages"]
        if ours["BLOCK_M"] > 16:  # the train step's large-batch tensor-core tiles: clean with MSE as they are
            assert ours == theirs
        elif theirs["BLOCK_OUT"] > 256:  # a wide logits tile: 16 warps, K steps of at most 32
            assert (ours["num_warps"], ours["BLOCK_K"]) == (16, min(theirs["BLOCK_K"], 32))
        else:  # hidden slices of at most 32: 4 warps; fp32 IEEE past two layers: K steps of 16
            assert ours["num_warps"] == (4 if theirs["BLOCK_H"] <= 32 else theirs["num_warps"])
            deep_ieee = len(widths) > 3 and dtype == torch.float32 and precision == "ieee"
            assert ours["BLOCK_K"] == (min(theirs["BLOCK_K"], 16) if deep_ieee else theirs["BLOCK_K"])


def test_how_many_groups():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert R.hidden_split(8, 8, cuda, sm_count=132) == 8  # B = 128, hidden 1024: a group per slice
    assert R.hidden_split(64, 8, cuda, sm_count=132, tensor_cores=False) == 2  # B = 1024 fp32: one wave
    assert R.hidden_split(67, 8, cuda, sm_count=132, tensor_cores=False) == 1  # 2 · 67 programs: two waves
    assert R.hidden_split(64, 8, cuda, sm_count=132) == 1  # TF32 / 16-bit: L2-bound there, the split costs more
    assert R.hidden_split(33, 8, cuda, sm_count=132) == 4  # a quarter of the SMs
    assert R.hidden_split(8, 1, cuda, sm_count=132) == 1  # hidden 128 in the train step (TF32): one slice
    assert R.hidden_split(256, 8, cuda, sm_count=132) == 1  # the row blocks fill the GPU
    assert R.hidden_split(8, 8, cpu) == 1  # the interpreter: never (tests force it)


@pytest.mark.parametrize("loss,activation", [("class", "relu"), ("mse", "sigmoid")])
def test_the_row_pass_twin_against_autograd(loss, activation):
    """torch_ops.row_pass, the float64 reference above (and of bench.gpu_check), against eager autograd: dz and the
    pre-activation gradients of the summed loss, per-block sums of the row losses."""
    x, weights, biases, classes, target = _net(torch.float64, True)
    w1 = weights[0].clone().requires_grad_()
    pre = x @ w1.t() + biases[0]
    h = torch.relu(pre) if activation == "relu" else torch.sigmoid(pre)
    z = h @ weights[1].t() + biases[1]
    if loss == "class":
        rows_loss = torch.nn.functional.nll_loss(torch.log_softmax(z, 1), classes, reduction="none")
        counted = (classes != IGNORE).double()
    else:
        rows_loss = ((z - target) ** 2).sum(1)
        counted = torch.full((B,), float(N_OUT), dtype=torch.float64, device=x.device)
    d_pre, d_z = torch.autograd.grad(rows_loss.sum(), [pre, z])
    ref = _exact(x, weights, biases, activation, loss, classes, target)
    torch.testing.assert_close(ref["acts"], h.detach())
    torch.testing.assert_close(ref["dz"], d_z)
    torch.testing.assert_close(ref["dpres"], d_pre)
    block = CONFIG["BLOCK_M"]
    sums = [torch.stack([v[i:i + block].sum() for i in range(0, B, block)]) for v in (rows_loss.detach(), counted)]
    torch.testing.assert_close(ref["stats"], torch.stack(sums, 1))


def test_the_train_steps_large_tiles_from_enough_rows_times_hidden_features():
    """The train step's row pass takes its 128-row tensor-core tiles (two layers) from STEP_LARGE_WORK rows × hidden
    features (and STEP_LARGE_ROWS rows): 4096 rows at hidden 128, 512 at 1024, 256 at 4096 — in TF32 from half
    that work at twice the rows too: 2048 at hidden 128, 1024 at 256, 512 at 512 —, where bench.model predicts
    the step faster than with 16-row tiles, and every large tile from LARGE_BATCH rows, as a module's forward."""
    def block_m(n_rows, widths, dtype=torch.bfloat16, backward=True, precision="ieee"):
        return R.rows_config(n_rows, widths, dtype, forward=True, backward=backward, precision=precision)["BLOCK_M"]

    def tf32(n_rows, widths):
        return block_m(n_rows, widths, torch.float32, precision="tf32")

    assert (block_m(4095, (784, 128, 10)), block_m(4096, (784, 128, 10))) == (16, 128)
    assert (block_m(511, (784, 1024, 10)), block_m(512, (784, 1024, 10))) == (16, 128)
    assert (block_m(128, (784, 4096, 10)), block_m(256, (784, 4096, 10))) == (16, 128)  # at least 256 rows
    assert (block_m(2048, (784, 128, 10)), block_m(1024, (784, 256, 10))) == (16, 16)  # 16-bit: the whole work
    assert (tf32(2047, (784, 128, 10)), tf32(2048, (784, 128, 10)), tf32(4096, (784, 128, 10))) == (16, 128, 128)
    assert (tf32(1024, (784, 256, 10)), tf32(512, (784, 512, 10)), tf32(256, (784, 4096, 10))) == (128, 128, 128)
    assert (tf32(511, (784, 1024, 10)), tf32(256, (784, 1024, 10))) == (16, 16)  # half the work: 512 rows
    # other tiles than the 128-row ones (three layers, an unaligned input) keep LARGE_BATCH, as the narrow hidden
    # layers below the work threshold do
    assert (block_m(8192, (784, 128, 128, 10)), block_m(16384, (784, 128, 128, 10))) == (16, 64)
    assert (block_m(8192, (1000, 128, 10)), block_m(16384, (1000, 128, 10))) == (16, 64)
    assert (block_m(16383, (784, 16, 10)), block_m(16384, (784, 16, 10))) == (16, 128)
    assert block_m(4096, (784, 128, 10), torch.float32) == 16  # fp32 IEEE: never
    assert block_m(16384, (1000, 100, 10)) == 16  # unaligned hidden widths: never
    assert (block_m(8192, (784, 128, 10), backward=False), block_m(16384, (784, 128, 10), backward=False)) == (32, 64)
    assert R.row_partials_pay(4096, (784, 128, 10), torch.bfloat16)  # with the large tiles, the row partials
    assert not R.row_partials_pay(4095, (784, 128, 10), torch.bfloat16)
