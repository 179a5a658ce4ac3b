"""The steps of :func:`pyfused.cli.train.train`: one interface over FusedTrainStep and the plain-PyTorch eager
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

from pyfused.modules import DeepFusedMLP, FusedMLP
from pyfused.optim import FusedAdam, FusedAdamW, FusedSGD
from pyfused.train_step import FusedTrainStep


def seeded_linears(args) -> list[nn.Linear]:
    """fc1 … fcL (784 → the --hidden widths → 10), created on the CPU right after torch.manual_seed(seed): the
    seed's initial weights."""
    torch.manual_seed(args.seed)
    widths = (784, *args.hidden, 10)
    return [nn.Linear(n_in, n_out, bias=args.bias) for n_in, n_out in zip(widths, widths[1:])]


OPTIMIZER_CLASSES = {"sgd": (FusedSGD, torch.optim.SGD), "adam": (FusedAdam, torch.optim.Adam),
                     "adamw": (FusedAdamW, torch.optim.AdamW)}


def make_optimizer(params, args, fused: bool):
    """``--optimizer`` over ``params``: pyfused's (``fused``) or torch.optim's, with --lr, --weight-decay (and
    --momentum for SGD)."""
    options = dict(lr=args.lr, weight_decay=args.weight_decay)
    if args.optimizer == "sgd":
        options["momentum"] = args.momentum
    return OPTIMIZER_CLASSES[args.optimizer][0 if fused else 1](params, **options)


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
    """FusedTrainStep of ``model`` with the --optimizer behind the step interface: with the WORLD process group
    when ``ranks`` has one, and ``--accumulate`` accumulation steps."""
    optimizer = make_optimizer(model.parameters(), args, fused=True)
    group = dist.group.WORLD if ranks is not None and ranks.distributed else None
    return TrainStepAdapter(FusedTrainStep(model, optimizer, group, args.accumulate))


def build_fused(args, ranks):
    """(model, step): the FusedMLP (DeepFusedMLP for several hidden layers) on ``ranks.device`` and its
    :func:`fused_step`."""
    linears = seeded_linears(args)
    if len(linears) == 2:
        model = FusedMLP.from_linear(*linears, activation=args.activation[0])
    else:
        model = DeepFusedMLP.from_linear(*linears, activation=args.activation)
    model = model.to(ranks.device)
    return model, fused_step(model, args, ranks)


def reference_step(model, args):
    """:func:`module_step` with the torch.optim optimizer: the seed's code path."""
    return module_step(model, make_optimizer(model.parameters(), args, fused=False))


def build_reference(args, device):
    """(model, step): the seed's model, nn.Sequential of the same fc1 … fcL (same init) and activations."""
    linears = seeded_linears(args)
    layers = collections.OrderedDict()
    for i, fc in enumerate(linears, 1):
        layers[f"fc{i}"] = fc
        if i < len(linears):
            name = args.activation[i - 1]
            layers[name if len(linears) == 2 else f"{name}{i}"] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}[name]()
    layers["log_softmax"] = nn.LogSoftmax(dim=1)
    model = nn.Sequential(layers).to(device)
    return model, reference_step(model, args)
