"""torch.autocast: the fused ops give what the unfused graph gives under the same autocast — the layers in the
autocast dtype, the head and the losses in the dtypes autocast gives log_softmax, nll_loss, cross_entropy and
mse_loss on that device, float32 gradients of float32 parameters —, on both backends (CPU: bfloat16 on the torch
path, float16 on the interpreter, which has no bfloat16; CUDA: both)."""
import pytest
import torch
import torch.nn.functional as F

import pyfused
from pyfused import functional
from pyfused.checks import DTypeError
from tests.utils import DEVICE

TOL16 = {torch.bfloat16: dict(atol=3e-2, rtol=3e-2), torch.float16: dict(atol=4e-3, rtol=4e-3)}
HEADS = [("log_softmax", "none"), ("logits", "none"), ("log_softmax", "nll"), ("logits", "cross_entropy"),
         ("logits", "mse")]


def _dtypes(backend):
    if DEVICE == "cuda":
        return [torch.float16, torch.bfloat16]
    return [torch.bfloat16] if backend == "torch" else [torch.float16]


def _net(depth=2, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = (7, 9, 6, 4)[:depth] + (3,)
    ws = [(torch.randn(o, i, generator=g) / i ** 0.5).to(DEVICE).requires_grad_() for i, o in zip(widths, widths[1:])]
    bs = [(torch.randn(o, generator=g) * 0.1).to(DEVICE).requires_grad_() if bias or k == depth - 1 else None
          for k, o in enumerate(widths[1:])]
    x = torch.randn(10, 7, generator=g).to(DEVICE)
    target = torch.randint(0, 3, (10,), generator=g).to(DEVICE)
    target[3] = -100
    return x, ws, bs, target, torch.randn(10, 3, generator=g).to(DEVICE)


def _unfused(x, ws, bs, activations, head, loss, target, mse_target):
    a = x
    for w, b, act in zip(ws[:-1], bs[:-1], activations):
        a = F.linear(a, w, b)
        a = F.relu(a) if act == "relu" else torch.sigmoid(a)
    z = F.linear(a, ws[-1], bs[-1])
    y = F.log_softmax(z, -1) if head == "log_softmax" else z
    if loss == "none":
        return y
    if loss == "mse":
        return F.mse_loss(z, mse_target)
    return (F.nll_loss if loss == "nll" else F.cross_entropy)(y, target)


def _fused(x, ws, bs, activations, head, loss, target, mse_target):
    t = None if loss == "none" else (mse_target if loss == "mse" else target)
    return pyfused.fused_deep_mlp(x, ws, bs, activations, t, log_softmax=head == "log_softmax",
                                  loss=None if loss == "none" else loss)


@pytest.mark.parametrize("device_type", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head,loss", HEADS)
def test_the_result_dtype_is_autocasts(device_type, amp, head, loss):
    """autocast_out_dtype is autocast's own policy (probed on eager ops)."""
    z = torch.randn(4, 3, device=device_type)
    with torch.autocast(device_type, amp):
        got = _unfused(z, [torch.eye(3, device=device_type)] * 2, [None, None], ["relu"], head, loss,
                       torch.zeros(4, dtype=torch.long, device=device_type), z).dtype
    assert functional.autocast_out_dtype(device_type, amp, head, loss) == got


@pytest.mark.parametrize("depth,bias,activations", [(2, True, ("relu",)), (3, False, ("sigmoid", "relu"))])
@pytest.mark.parametrize("head,loss", HEADS)
def test_fused_ops_under_autocast_match_the_unfused_graph(backend, head, loss, depth, bias, activations):
    for amp in _dtypes(backend):
        results = []
        for fn in (_fused, _unfused):
            x, ws, bs, target, mse_target = _net(depth, bias)
            with torch.autocast(DEVICE, amp):
                out = fn(x, ws, bs, activations, head, loss, target, mse_target)
            params = [t for t in (*ws, *bs) if t is not None]
            grads = torch.autograd.grad(out, params, torch.ones_like(out))
            results.append((out, grads))
        (ours, our_grads), (theirs, their_grads) = results
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, **TOL16[amp])
        for a, b in zip(our_grads, their_grads):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, **TOL16[amp])


def test_the_torch_path_under_autocast_is_eagers_graph(monkeypatch):
    monkeypatch.setenv("PYFUSED_BACKEND", "torch")
    x, ws, bs, target, _ = _net()
    with torch.autocast("cpu", torch.bfloat16):
        ours = pyfused.fused_mlp_nll(x.cpu(), ws[0].cpu(), bs[0].cpu(), ws[1].cpu(), bs[1].cpu(), target.cpu())
        theirs = _unfused(x.cpu(), [w.cpu() for w in ws], [b.cpu() for b in bs], ["relu"], "log_softmax", "nll",
                          target.cpu(), None)
    assert torch.equal(ours, theirs)


def test_kernels_with_a_float32_head_of_16_bit_layers(backend, monkeypatch):
    """CUDA's policy (log_softmax in float32 from the 16-bit logits) on any device: the kernels store the head in
    float32 and take a float32 incoming gradient."""
    if backend == "torch" or DEVICE == "cuda":
        pytest.skip("the kernels on CPU (CUDA runs this policy in the test above)")
    monkeypatch.setattr(functional, "autocast_out_dtype", lambda *a: torch.float32)
    x, ws, bs, *_ = _net()
    with torch.autocast("cpu", torch.float16):
        ours = pyfused.fused_mlp(x, ws[0], bs[0], ws[1], bs[1])
        z = F.linear(F.relu(F.linear(x, ws[0], bs[0])), ws[1], bs[1])
    theirs = F.log_softmax(z.float(), -1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, **TOL16[torch.float16])
    grad = torch.linspace(-1, 1, 30).view(10, 3)
    for a, b in zip(torch.autograd.grad(ours, ws, grad), torch.autograd.grad(theirs, ws, grad)):
        torch.testing.assert_close(a, b, **TOL16[torch.float16])


def test_mixed_dtypes_are_reconciled_under_autocast_only(backend):
    amp = _dtypes(backend)[0]
    model = pyfused.FusedMLP(7, 9, 3).to(DEVICE)
    x = torch.randn(4, 7, device=DEVICE).to(amp)  # from an earlier autocast layer
    with torch.autocast(DEVICE, amp):
        assert model(x).dtype == functional.autocast_out_dtype(DEVICE, amp, "log_softmax", "none")
        mse = pyfused.fused_mlp_mse(x, model.fc1.weight, model.fc1.bias, model.fc2.weight, model.fc2.bias,
                                    torch.randn(4, 3, device=DEVICE))
        assert mse.dtype == torch.float32
    with pytest.raises(DTypeError, match="w1 must have x's dtype"):
        model(x)


def test_float64_is_left_alone_by_autocast(backend):
    model = pyfused.FusedMLP(7, 9, 3).double().to(DEVICE)
    x = torch.randn(4, 7, dtype=torch.float64, device=DEVICE)
    with torch.autocast(DEVICE, _dtypes(backend)[0]):
        assert model(x).dtype == torch.float64
        with pytest.raises(DTypeError, match="under autocast"):
            pyfused.FusedMLP(7, 9, 3).to(DEVICE)(x)
