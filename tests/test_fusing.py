"""pyfused.fuse / unfuse: in place, same children, Parameters, state_dict keys and optimizer state; the fused
model's outputs, gradients and a whole training run equal the unfused model's; what does not match is left alone."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyfused
from pyfused.fusing import FusedSequential, find_runs, is_fused
from pyfused.kernels.launch import observe
from tests.utils import DEVICE, STEP_TOL, TOL


class Net(nn.Module):
    """Nested Sequentials: a classifier block that matches, a block that does not (Tanh), a frozen layer."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16)))
        self.head = nn.Sequential(nn.Linear(16, 10), nn.ReLU(), nn.Linear(10, 8), nn.Sigmoid(), nn.Linear(8, 5),
                                  nn.LogSoftmax(dim=-1))
        self.head[2].requires_grad_(False)  # a frozen layer inside the fused run

    def forward(self, x):
        return self.head(self.features(x))


def _pair(seed=0):
    torch.manual_seed(seed)
    model = Net().to(DEVICE)
    return model, copy.deepcopy(model)


def test_fuse_is_in_place_and_keeps_the_modules_parameters_and_state_dict():
    model, ref = _pair()
    params = list(model.parameters())
    keys = list(model.state_dict())
    out, fused = pyfused.fuse(model)
    assert out is model and fused == ["head[0:6] Linear → ReLU → Linear → Sigmoid → Linear → LogSoftmax"]
    assert type(model.head) is FusedSequential and type(model.features[1]) is nn.Sequential  # Tanh: left alone
    assert list(model.parameters()) == params and list(model.state_dict()) == keys
    model.load_state_dict(ref.state_dict())  # checkpoints of the unfused model load
    pyfused.unfuse(model)
    assert not is_fused(model) and type(model.head) is nn.Sequential


def test_fused_model_matches_the_unfused_one_and_launches_one_forward(backend):
    model, ref = _pair()
    pyfused.fuse(model)
    x = torch.randn(6, 3, 4, device=DEVICE)
    seen = []
    with observe(seen.append):
        out = model(x)
    if backend == "triton":
        assert len(seen) == 1
    theirs = ref(x)
    torch.testing.assert_close(out, theirs, **TOL[torch.float32])
    target = torch.randint(0, 5, (6,), device=DEVICE)
    F.nll_loss(out, target).backward()
    F.nll_loss(theirs, target).backward()
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None), name  # the frozen layer gets none
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float32], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_training_run_of_the_fused_model_equals_the_unfused_run(backend, optimizer):
    model, ref = _pair()
    pyfused.fuse(model)
    make = (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)) if optimizer == "sgd" else \
        (lambda p: torch.optim.Adam(p, lr=0.01))
    opts = [make(m.parameters()) for m in (model, ref)]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, t = torch.randn(9, 12, generator=g).to(DEVICE), torch.randint(0, 5, (9,), generator=g).to(DEVICE)
        losses = []
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            loss = F.nll_loss(m(x), t)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], **STEP_TOL)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **STEP_TOL)
    # the optimizer's state survives unfuse (the same Parameters)
    pyfused.unfuse(model)
    assert all(p in opts[0].state for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(model(x), ref(x), **STEP_TOL)


def test_what_does_not_match_is_left_alone():
    hooked = nn.Linear(4, 4)
    hooked.register_forward_hook(lambda *a: None)

    class MyLinear(nn.Linear):
        pass

    blocks = {
        "one linear": [nn.Linear(4, 4), nn.ReLU()],
        "tanh": [nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)],
        "dropout": [nn.Linear(4, 4), nn.Dropout(), nn.ReLU(), nn.Linear(4, 4)],
        "subclass": [MyLinear(4, 4), nn.ReLU(), nn.Linear(4, 4)],
        "hook": [hooked, nn.ReLU(), nn.Linear(4, 4)],
    }
    for name, layers in blocks.items():
        model = nn.Sequential(*layers)
        assert pyfused.fuse(model)[1] == [], name
        assert type(model) is nn.Sequential, name


def test_runs_are_maximal_and_the_rest_runs_unfused(backend):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7), nn.ReLU(), nn.Tanh(), nn.Linear(7, 4), nn.Sigmoid(),
              nn.Linear(4, 3), nn.LogSoftmax(dim=1)]  # dim=1: not fused (only dim=-1 is the fused head)
    runs = find_runs(layers)
    assert [(r.start, r.stop, r.activations, r.log_softmax) for r in runs] == [
        (0, 3, ("relu",), False), (5, 8, ("sigmoid",), False)]
    model = nn.Sequential(*layers).to(DEVICE)
    ref = copy.deepcopy(model)
    pyfused.fuse(model)
    x = torch.randn(4, 5, device=DEVICE)
    torch.testing.assert_close(model(x), ref(x), **TOL[torch.float32])


def test_fuse_twice_and_pickling():
    model, ref = _pair()
    pyfused.fuse(model)
    assert pyfused.fuse(model)[1] == pyfused.fuse(ref)[1]
    clone = copy.deepcopy(model)
    assert type(clone.head) is FusedSequential
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pyfused.fuse([nn.Linear(2, 2)])
