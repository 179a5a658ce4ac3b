"""The steps of :func:`pyfused.train.train`: one interface over FusedTrainStep and the plain-PyTorch eager
loop (the reference), so that the training loop is written once.

A step is ``step(x, y, denom, update, total)``: it adds the gradient of ``Σ nll(x, y) / denom`` (the summed
NLL loss of the rows; the loop picks ``denom``) to the parameters' gradients, applies the optimizer when
``update`` (leaving zeroed gradients for the next group), and adds ``Σ nll(x, y)`` to the 0-dim tensor
``total``, all without a host sync.
"""
from __future__ import annotations

import collections

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pyfused.modules import FusedMLP
from pyfused.optim import FusedSGD
from pyfused.train_step import FusedTrainStep


def seeded_linears(args) -> list[nn.Linear]:
    """fc1 then fc2, created on the CPU right after torch.manual_seed(seed): the seed's initial weights."""
    torch.manual_seed(args.seed)
    return [nn.Linear(784, args.hidden, bias=args.bias), nn.Linear(args.hidden, 10, bias=args.bias)]


class TrainStepAdapter:
    """A FusedTrainStep behind the step interface. The train step scales each batch itself (its mean loss over
    every rank's rows, divided by ``accumulation_steps``), which is the loop's ``denom`` when every global batch
    counts all its rows; an ``update`` at the end of a trailing partial group is its ``flush()``."""

    def __init__(self, train_step: FusedTrainStep) -> None:
        self.train_step = train_step

    def __call__(self, x, y, denom, update, total) -> None:
        total.add_(self.train_step(x, y), alpha=len(y))  # the mean over all ranks' rows, times this rank's rows
        if update:
            self.train_step.flush()


def module_step(net, optimizer):
    """The eager step: ``(F.nll_loss(net(x), y, reduction="sum") / denom).backward()``, then on ``update``
    ``optimizer.step()`` and ``zero_grad``."""

    def step(x, y, denom, update, total) -> None:
        loss = F.nll_loss(net(x), y, reduction="sum")
        (loss / denom).backward()
        if update:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        total.add_(loss.detach())
    return step


def fused_step(model, args, ranks=None):
    """FusedTrainStep of ``model`` (a FusedMLP) with FusedSGD behind the step interface: with the WORLD process
    group when ``ranks`` has one, and ``--accumulate`` accumulation steps."""
    optimizer = FusedSGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    group = dist.group.WORLD if ranks is not None and ranks.distributed else None
    return TrainStepAdapter(FusedTrainStep(model, optimizer, group, args.accumulate))


def build_fused(args, ranks):
    """(model, step): the FusedMLP on ``ranks.device`` and its :func:`fused_step`."""
    model = FusedMLP.from_linear(*seeded_linears(args), activation=args.activation).to(ranks.device)
    return model, fused_step(model, args, ranks)


def reference_step(model, args):
    """:func:`module_step` with torch.optim.SGD: the seed's code path."""
    return module_step(model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum))


def build_reference(args, device):
    """(model, step): the seed's model, nn.Sequential of the same fc1, fc2 (same init) on ``device``."""
    fc1, fc2 = seeded_linears(args)
    act = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[args.activation]()
    model = nn.Sequential(collections.OrderedDict(
        fc1=fc1, **{args.activation: act}, fc2=fc2, log_softmax=nn.LogSoftmax(dim=1))).to(device)
    return model, reference_step(model, args)
