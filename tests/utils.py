"""Shared test helpers: the device, tolerance tables, the eager (nn.Sequential) twins of the fused models, their
losses and optimizers, and batch makers. Tests import from here, not from conftest (which holds fixtures)."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import pyfused

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY = dict(condition=not torch.cuda.is_available(), reason="needs a GPU")

# outputs and gradients of one call against float64 PyTorch, per dtype (TF32 is float32 with TF32 matmuls)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float64: dict(atol=1e-10, rtol=1e-10),
       "tf32": dict(atol=2e-2, rtol=2e-2)}
# trajectories of several optimizer steps against the eager loop in the same dtype (float32): the CPU paths
# (torch path: eager's own ops; interpreter: IEEE fp32 in other summation orders), and CUDA's reduction orders
STEP_TOL = dict(rtol=1e-5, atol=1e-6) if DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-5)
FLASH_ATOL = 2e-3  # 16-bit types: |ours − ref64| ≤ 2·|torch_same_dtype − ref64| + FLASH_ATOL

OPTIMIZERS = {  # name: (pyfused class, torch class, options that exercise the update's branches)
    "sgd": (pyfused.FusedSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": (pyfused.FusedAdam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    "adamw": (pyfused.FusedAdamW, torch.optim.AdamW, dict(lr=0.01, betas=(0.8, 0.99), maximize=True)),
}


def eager_twin(model, dtype=None) -> nn.Sequential:
    """nn.Sequential of copies of a fused model's nn.Linear layers, its activations and (for a log_softmax model)
    nn.LogSoftmax: the eager model it replaces."""
    layers = []
    linears = model.linears()
    for i, fc in enumerate(linears):
        layers.append(copy.deepcopy(fc))
        if i < len(linears) - 1:
            layers.append(nn.ReLU() if model.activations[i] == "relu" else nn.Sigmoid())
    if model.log_softmax:
        layers.append(nn.LogSoftmax(dim=-1))
    net = nn.Sequential(*layers)
    return net if dtype is None else net.to(dtype)


def eager_loss(loss, out, target, reduction="mean", ignore_index=-100):
    """``F.nll_loss`` / ``F.cross_entropy`` / ``F.mse_loss`` of an eager model's output."""
    if loss == "mse":
        return F.mse_loss(out, target, reduction=reduction)
    fn = F.nll_loss if loss == "nll" else F.cross_entropy
    return fn(out, target, reduction=reduction, ignore_index=ignore_index)


def steps_match_eager(step, ref, ref_opt, loss, data, k=1):
    """Run ``step`` (a FusedTrainStep with ``accumulation_steps=k``) and the eager loop — each batch's loss / k
    backward, an update every k batches — over ``data``, asserting each batch's loss."""
    for i, (x, t) in enumerate(data):
        ours = step(x, t)
        theirs = eager_loss(loss, ref(x), t)
        (theirs / k).backward()
        if (i + 1) % k == 0:
            ref_opt.step()
            ref_opt.zero_grad()
        torch.testing.assert_close(ours, theirs.detach(), **STEP_TOL)


def step_and_eager(model, optimizer, loss, k=1):
    """``(step, opt, ref, ref_opt)``: a FusedTrainStep of ``model`` with the fused ``optimizer`` of
    :data:`OPTIMIZERS` (``accumulation_steps=k``), and the eager twin with the torch optimizer, same options."""
    ref = eager_twin(model)
    fused_cls, torch_cls, options = OPTIMIZERS[optimizer]
    opt, ref_opt = fused_cls(model.parameters(), **options), torch_cls(ref.parameters(), **options)
    return pyfused.FusedTrainStep(model, opt, loss=loss, accumulation_steps=k), opt, ref, ref_opt


def params_and_states_match(model, opt, ref, ref_opt) -> None:
    """Every parameter and every tensor state of the optimizer (momentum, Adam's moments) as the eager loop's."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **STEP_TOL, msg=lambda m: f"{name}: {m}")
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.numel() > 1:
                torch.testing.assert_close(value, ref_opt.state[q][key], **STEP_TOL,
                                           msg=lambda m: f"{name} {key}: {m}")


def batches(loss, rows, n_in, n_out, steps, seed=1, all_ignored_at=None, device=DEVICE):
    """Random batches: class targets with every 5th row ignored (every row at step ``all_ignored_at``), or float
    targets of the logits' shape for MSE."""
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(rows, n_in, generator=g)
        if loss == "mse":
            t = torch.randn(rows, n_out, generator=g)
        else:
            t = torch.randint(0, n_out, (rows,), generator=g)
            t[::5] = -100
            if i == all_ignored_at:
                t[:] = -100
        yield x.to(device), t.to(device)


def within_flash(ours, same, exact, atol=FLASH_ATOL) -> None:
    """The flash-attention rule for 16-bit results, elementwise."""
    err, torch_err = (ours.double() - exact.double()).abs(), (same.double() - exact.double()).abs()
    excess = (err - 2 * torch_err - atol).max().item() if err.numel() else 0.0
    assert excess <= 0, f"max excess over 2·|torch − ref64| + {atol}: {excess:.3g}"


# optimizer tests: parameter shapes (0-dim, empty, a full and a ragged kernel block), and which get grads late or never
SHAPES = [(7, 5), (5,), (), (0,), (3, 4, 2), (3000,), (4,)]  # (3000,): a full and a ragged 2048-block
LATE, NEVER = 1, 6  # parameter indices: gets its first grad at step 5 / never gets one


def make_params(device, dtypes=(torch.float32,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtypes[i % len(dtypes)]).requires_grad_()
            for i, s in enumerate(SHAPES)]


def twin(params, dtype=None):
    return [p.detach().to(dtype or p.dtype).clone().requires_grad_() for p in params]


def closure_for(opt, params, targets):
    """An optimizer closure: zero the gradients, then backward a quadratic loss of every parameter but the last
    (which so never gets a gradient) towards ``targets``; returns the loss."""
    def closure():
        opt.zero_grad()
        loss = sum(((p - t) ** 2).sum() + p.sum() for p, t in zip(params[:-1], targets))
        loss.backward()
        return loss
    return closure


def set_grads(step, *param_lists):
    """The same random gradient for the i-th parameter of every list; on odd steps written in place, on even
    steps as new tensors (new addresses: the kernel's address table must follow)."""
    g = torch.Generator().manual_seed(1000 + step)
    for i, ps in enumerate(zip(*param_lists)):
        if i == NEVER or (i == LATE and step < 5):
            continue
        grad = torch.randn(ps[0].shape, generator=g, dtype=torch.float64).to(ps[0].dtype)
        for p in ps:
            if step % 2 and p.grad is not None:
                p.grad.copy_(grad)
            else:
                p.grad = grad.to(p.device, p.dtype)


def pytorch_optimizer_inputs():
    """``torch.testing._internal.common_optimizers`` (PyTorch's own optimizer test inputs), imported without leaving
    ``torch.backends``' flags frozen: its ``common_utils`` freezes them at import for PyTorch's own suite, and later
    tests here set them."""
    frozen = torch.backends.flags_frozen()
    from torch.testing._internal import common_optimizers

    if not frozen and torch.backends.flags_frozen():
        vars(torch.backends.m)["__allow_nonbracketed_mutation_flag"] = True
    return common_optimizers
