"""``pyfused.fuse(model)``: the fused kernels for an existing model, in place, in one line.

Every ``nn.Sequential`` inside ``model`` (``model`` itself included) that holds a run of ``nn.Linear → nn.ReLU |
nn.Sigmoid → nn.Linear [→ act → nn.Linear …] [→ nn.LogSoftmax(dim=-1)]`` becomes a :class:`FusedSequential`: the
same object with the same children, Parameters and state_dict keys (only its class changes), whose forward runs
each matched run as one fused op (:func:`pyfused.fused_deep_mlp`: one launch forward, two backward) and every
other child as before. Optimizers, checkpoints, ``.to()``, hooks on the model and DDP keep working;
:func:`unfuse` restores the plain class.

Left alone: Sequential subclasses (their forward may differ), children with forward hooks or pre-hooks, layers of
other types (Linear subclasses, other activations, dropout between layers), and runs of one Linear.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import nn

from pyfused.functional import fused_deep_mlp

_ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}


class Run(NamedTuple):
    """One fused run of a Sequential: children ``start`` … ``stop − 1``."""

    start: int
    stop: int
    activations: tuple
    log_softmax: bool


def _plain(module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def _linear(module) -> bool:
    return type(module) is nn.Linear and _plain(module)


def find_runs(children: list) -> list:
    """The maximal runs of ``children`` (a Sequential's modules, in order) that :func:`fused_deep_mlp` computes."""
    runs, i = [], 0
    while i < len(children):
        if not _linear(children[i]):
            i += 1
            continue
        stop, activations = i + 1, []
        while (stop + 1 < len(children) and type(children[stop]) in _ACTIVATIONS and _plain(children[stop])
               and _linear(children[stop + 1])):
            activations.append(_ACTIVATIONS[type(children[stop])])
            stop += 2
        if not activations:
            i += 1
            continue
        log_softmax = (stop < len(children) and type(children[stop]) is nn.LogSoftmax
                       and children[stop].dim == -1 and _plain(children[stop]))
        runs.append(Run(i, stop + log_softmax, tuple(activations), log_softmax))
        i = stop + log_softmax
    return runs


class FusedSequential(nn.Sequential):
    """An ``nn.Sequential`` whose matched runs (``_pyfused_runs``) run fused; made by :func:`fuse` only."""

    _pyfused_runs: tuple = ()

    def forward(self, input):
        children = list(self._modules.values())
        runs = {run.start: run for run in self._pyfused_runs}
        i = 0
        while i < len(children):
            run = runs.get(i)
            if run is None:
                input = children[i](input)
                i += 1
                continue
            linears = children[run.start:run.stop - run.log_softmax:2]
            input = fused_deep_mlp(input, [fc.weight for fc in linears], [fc.bias for fc in linears],
                                   run.activations, log_softmax=run.log_softmax)
            i = run.stop
        return input


def _describe(prefix: str, children: list, run: Run) -> str:
    names = " → ".join(type(m).__name__ for m in children[run.start:run.stop])
    where = f"{prefix}[{run.start}:{run.stop}]" if prefix else f"[{run.start}:{run.stop}]"
    return f"{where} {names}"


def fuse(model: nn.Module):
    """Fuse every matching run of every plain ``nn.Sequential`` in ``model``, in place (see the module docstring).
    Returns ``(model, fused)``: ``fused`` lists each fused run as ``"name[start:stop] Linear → ReLU → …"``.
    Calling it again refreshes the runs (after children changed)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fused = []
    for name, module in model.named_modules():
        if type(module) not in (nn.Sequential, FusedSequential):
            continue
        children = list(module._modules.values())
        runs = tuple(find_runs(children))
        if not runs:
            if type(module) is FusedSequential:
                _restore(module)
            continue
        module.__class__ = FusedSequential
        module._pyfused_runs = runs
        fused += [_describe(name, children, run) for run in runs]
    return model, fused


def _restore(module) -> None:
    module.__class__ = nn.Sequential
    module.__dict__.pop("_pyfused_runs", None)


def unfuse(model: nn.Module) -> nn.Module:
    """Undo :func:`fuse`: every FusedSequential in ``model`` is a plain nn.Sequential again. Returns ``model``."""
    for module in model.modules():
        if type(module) is FusedSequential:
            _restore(module)
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether :func:`fuse` left a fused run in ``model``."""
    return any(type(m) is FusedSequential for m in model.modules())


__all__ = ["fuse", "unfuse", "is_fused", "FusedSequential", "find_runs", "Run"]
