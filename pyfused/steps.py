"""The steps of :func:`pyfused.train.train`: one interface over FusedTrainStep, the eager loop, DDP and the
plain-PyTorch reference, so that the training loop is written once.

A step is ``step(x, y, denom, update, total)``: it adds the gradient of ``Σ nll(x, y) / denom`` (the summed
NLL loss of the rows; the loop picks ``denom``) to the parameters' gradients, applies the optimizer when
``update`` (leaving zeroed gradients for the next group), and adds ``Σ nll(x, y)`` to the 0-dim tensor
``total``, all without a host sync.
"""
from __future__ import annotations

import collections
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pyfused.modules import FusedMLP
from pyfused.optim import FusedSGD
from pyfused.train_step import FusedTrainStep


def seeded_linears(args) -> list[nn.Linear]:
    """fc1 then fc2, created on the CPU right after torch.manual_seed(seed): the seed's initial weights."""
    torch.manual_seed(args.seed)
    return [nn.Linear(784, args.hidden, bias=args.bias), nn.Linear(args.hidden, 10, bias=args.bias)]


class WholeBatchStep:
    """A FusedTrainStep behind the step interface, for runs where every batch is one whole update (one process,
    no accumulation): then ``denom`` is always the batch's row count, the train step's own mean."""

    def __init__(self, train_step: FusedTrainStep) -> None:
        self.train_step = train_step
        self.capture = train_step.capture

    def __call__(self, x, y, denom, update, total) -> None:
        total.add_(self.train_step(x, y), alpha=len(y))


def module_step(net, optimizer, no_sync=None):
    """The eager step: ``(F.nll_loss(net(x), y, reduction="sum") / denom).backward()``, then on ``update``
    ``optimizer.step()`` and ``zero_grad``. ``no_sync`` is DDP's context manager, entered for the batches that
    do not update, so that the ranks all-reduce the accumulated gradients once per update."""

    def step(x, y, denom, update, total) -> None:
        with contextlib.nullcontext() if update or no_sync is None else no_sync():
            loss = F.nll_loss(net(x), y, reduction="sum")
            (loss / denom).backward()
        if update:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
        total.add_(loss.detach())
    return step


def fused_step(model, args, ranks=None):
    """FusedSGD over ``model`` (a FusedMLP) behind the step interface: FusedTrainStep when every batch is a whole
    update in one process, else :func:`module_step` over ``DistributedDataParallel(model)`` (with a process
    group in ``ranks``) or over ``model`` itself (``--accumulate`` > 1)."""
    optimizer = FusedSGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    if ranks is not None and ranks.distributed:
        device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=device_ids)
        return module_step(net, optimizer, net.no_sync)
    if args.accumulate > 1:
        return module_step(model, optimizer)
    return WholeBatchStep(FusedTrainStep(model, optimizer))


def build_fused(args, ranks):
    """(model, step): the FusedMLP on ``ranks.device`` and its :func:`fused_step`."""
    model = FusedMLP.from_linear(*seeded_linears(args)).to(ranks.device)
    return model, fused_step(model, args, ranks)


def reference_step(model, args):
    """:func:`module_step` with torch.optim.SGD: the seed's code path."""
    return module_step(model, torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum))


def build_reference(args, device):
    """(model, step): the seed's model, nn.Sequential of the same fc1, fc2 (same init) on ``device``."""
    fc1, fc2 = seeded_linears(args)
    model = nn.Sequential(collections.OrderedDict(
        fc1=fc1, relu=nn.ReLU(), fc2=fc2, log_softmax=nn.LogSoftmax(dim=1))).to(device)
    return model, reference_step(model, args)
