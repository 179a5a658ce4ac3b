"""The course's programs, each written as the course writes it and in its pyfused form, from the same initial state:
the losses after every step, and the parameters and optimizer state at the end, on the torch path and on the
kernels (Triton's interpreter on CPU, at cut shapes where it is slow).

1. a Linear(1000, 100) → ReLU → Linear(100, 10) regression net on random targets with the summed squared error:
   with raw weight tensors (``x.mm(w1).clamp(min=0).mm(w2)``, w1 stored (in, hidden)) and a manual update; as
   nn.Sequential with bias and a manual update; with torch.optim.Adam; with Adam and gradient accumulation over
   8 batches (``loss / 8``, ``step()`` every 8);
2. a 20 → 13 → 8 → 3 net, ReLU then sigmoid, bias only on the last layer, nn.CrossEntropyLoss, plain SGD and SGD
   with momentum;
3. the Fashion-MNIST ``fit()``: 784 → 128 → 10, no bias, log_softmax + NLL, momentum SGD.

Tolerances (float32): relative 1e-5 on the torch path (eager's own ops: equal to rounding), 1e-4 on the kernels
(other summation orders, compounded over the steps).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfused

from utils import DEVICE

STEPS = 12


def tol(backend):
    return dict(rtol=1e-5, atol=1e-5) if backend == "torch" and DEVICE == "cpu" else dict(rtol=1e-4, atol=1e-4)


def sizes(backend):
    """(N, D_in, H, D_out): the course's, cut for the interpreter."""
    return (64, 1000, 100, 10) if backend == "torch" or DEVICE == "cuda" else (16, 100, 30, 10)


def regression_data(backend, batches=1):
    n, d_in, _, d_out = sizes(backend)
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(n, d_in, generator=g).to(DEVICE), torch.randn(n, d_out, generator=g).to(DEVICE))
            for _ in range(batches)]


def check(ours, theirs, backend):
    for name, a, b in zip(("losses", *(f"tensor {i}" for i in range(len(ours) - 1))), ours, theirs):
        torch.testing.assert_close(a, b, **tol(backend), msg=lambda m: f"{name}: {m}")


def test_raw_tensors_and_a_manual_update(backend):
    """``y_pred = x.mm(w1).clamp(min=0).mm(w2); loss = (y_pred - y).pow(2).sum()`` and ``w -= lr * w.grad``;
    pyfused: the same tensors through fused_mlp_mse (nn.Linear layout: the transposes, no copies)."""
    n, d_in, h, d_out = sizes(backend)
    (x, y), = regression_data(backend)
    lr = 1e-6 if d_in == 1000 else 1e-4
    runs = []
    for fused in (False, True):
        g = torch.Generator().manual_seed(1)
        w1 = torch.randn(d_in, h, generator=g).to(DEVICE).requires_grad_()
        w2 = torch.randn(h, d_out, generator=g).to(DEVICE).requires_grad_()
        losses = []
        for _ in range(STEPS):
            if fused:
                loss = pyfused.fused_mlp_mse(x, w1.t(), None, w2.t(), None, y, reduction="sum")
            else:
                y_pred = x.mm(w1).clamp(min=0).mm(w2)
                loss = (y_pred - y).pow(2).sum()
            losses.append(loss.item())
            loss.backward()
            with torch.no_grad():
                w1 -= lr * w1.grad
                w2 -= lr * w2.grad
                w1.grad.zero_()
                w2.grad.zero_()
        runs.append((torch.tensor(losses), w1.detach(), w2.detach()))
    check(*runs[::-1], backend)


def _sequential(backend, fused):
    n, d_in, h, d_out = sizes(backend)
    torch.manual_seed(2)
    if fused:
        return pyfused.FusedMLP(d_in, h, d_out, log_softmax=False, device=DEVICE)
    return nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Linear(h, d_out)).to(DEVICE)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_sequential_with_bias_and_a_manual_update(backend):
    (x, y), = regression_data(backend)
    runs = []
    for fused in (False, True):
        model = _sequential(backend, fused)
        loss_fn = torch.nn.MSELoss(reduction="sum")
        losses = []
        for _ in range(STEPS):
            loss = model.mse_loss(x, y, reduction="sum") if fused else loss_fn(model(x), y)
            losses.append(loss.item())
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for param in model.parameters():
                    param -= 1e-4 * param.grad
        runs.append((torch.tensor(losses), *_params(model)))
    check(*runs[::-1], backend)


def _adam_state(opt, model):
    return [t.detach().clone() for p in model.parameters() for t in opt.state[p].values()]


@pytest.mark.parametrize("form", ["module", "train_step"])
def test_adam(backend, form):
    """torch.optim.Adam(lr=1e-4) on the summed squared error; pyfused: FusedMLP + FusedAdam, or FusedTrainStep."""
    (x, y), = regression_data(backend)
    runs = []
    for fused in (False, True):
        model = _sequential(backend, fused)
        optimizer = (pyfused.FusedAdam if fused else torch.optim.Adam)(model.parameters(), lr=1e-4)
        step = pyfused.FusedTrainStep(model, optimizer, loss="mse", reduction="sum") \
            if fused and form == "train_step" else None
        losses = []
        for _ in range(STEPS):
            if step is not None:
                losses.append(step(x, y).item())
                continue
            loss = model.mse_loss(x, y, reduction="sum") if fused else torch.nn.MSELoss(reduction="sum")(model(x), y)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        runs.append((torch.tensor(losses), *_params(model), *_adam_state(optimizer, model)))
    check(*runs[::-1], backend)


def test_adam_with_gradient_accumulation_over_8_batches(backend):
    """``loss = loss_fn(model(x), y) / 8; loss.backward()`` per batch, ``step(); zero_grad()`` every 8;
    pyfused: FusedTrainStep(..., accumulation_steps=8, loss="mse", reduction="sum") (its loss is the batch's)."""
    data = regression_data(backend, batches=16)
    runs = []
    for fused in (False, True):
        model = _sequential(backend, fused)
        optimizer = (pyfused.FusedAdam if fused else torch.optim.Adam)(model.parameters(), lr=1e-4)
        step = pyfused.FusedTrainStep(model, optimizer, accumulation_steps=8, loss="mse", reduction="sum") \
            if fused else None
        losses = []
        for t, (x, y) in enumerate(data):
            if fused:
                losses.append(step(x, y).item() / 8)
                continue
            loss = torch.nn.MSELoss(reduction="sum")(model(x), y) / 8
            losses.append(loss.item())
            loss.backward()
            if (t + 1) % 8 == 0:
                optimizer.step()
                optimizer.zero_grad()
        runs.append((torch.tensor(losses), *_params(model), *_adam_state(optimizer, model)))
    check(*runs[::-1], backend)


class SmallNet(nn.Module):
    """The course's small net: ReLU then sigmoid, bias only on the last layer, logits out."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 13, bias=False)
        self.fc2 = nn.Linear(13, 8, bias=False)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc3(torch.sigmoid(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("form", ["module", "train_step"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_small_net_cross_entropy_sgd(backend, momentum, form):
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(32, 20, generator=g).to(DEVICE), torch.randint(0, 3, (32,), generator=g).to(DEVICE))
            for _ in range(STEPS)]
    runs = []
    for fused in (False, True):
        torch.manual_seed(4)
        if fused:
            model = pyfused.DeepFusedMLP(20, 13, 8, 3, activation=("relu", "sigmoid"), bias=(False, False, True),
                                         log_softmax=False, device=DEVICE)
        else:
            model = SmallNet().to(DEVICE)
        optimizer = (pyfused.FusedSGD if fused else torch.optim.SGD)(model.parameters(), lr=0.1, momentum=momentum)
        step = pyfused.FusedTrainStep(model, optimizer, loss="cross_entropy") if fused and form == "train_step" \
            else None
        losses = []
        for x, t in data:
            if step is not None:
                losses.append(step(x, t).item())
                continue
            loss = model.cross_entropy(x, t) if fused else nn.CrossEntropyLoss()(model(x), t)
            losses.append(loss.item())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        state = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()] if momentum else []
        runs.append((torch.tensor(losses), *_params(model), *state))
    check(*runs[::-1], backend)


def test_fashion_mnist_fit(backend):
    """The seed's fit() loop (784 → 128 → 10, no bias, log_softmax + F.nll_loss, SGD lr 0.15 momentum 0.9) against
    FusedTrainStep, on synthetic batches of 128 (cut on the interpreter)."""
    n_in, hidden, batch = (784, 128, 128) if backend == "torch" or DEVICE == "cuda" else (64, 32, 32)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(n_in, hidden, bias=False)
            self.fc2 = nn.Linear(hidden, 10, bias=False)

        def forward(self, x):
            return F.log_softmax(self.fc2(F.relu(self.fc1(x.view(-1, n_in)))), dim=1)

    g = torch.Generator().manual_seed(5)
    data = [(torch.rand(batch, n_in, generator=g).to(DEVICE), torch.randint(0, 10, (batch,), generator=g).to(DEVICE))
            for _ in range(STEPS)]
    runs = []
    for fused in (False, True):
        torch.manual_seed(420)
        model = pyfused.FusedMLP(n_in, hidden, 10, bias=False, device=DEVICE) if fused else Net().to(DEVICE)
        optimizer = (pyfused.FusedSGD if fused else torch.optim.SGD)(model.parameters(), lr=0.15, momentum=0.9)
        step = pyfused.FusedTrainStep(model, optimizer) if fused else None
        losses = []
        for x, t in data:
            if fused:
                losses.append(step(x, t).item())
                continue
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), t)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((torch.tensor(losses), *_params(model)))
    check(*runs[::-1], backend)
