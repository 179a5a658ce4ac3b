"""How FusedTrainStep reads its optimizer: which update (SGD or Adam/AdamW), each parameter's param group,
hyper-parameter row and state tensors — the optimizer's own ``state``, so a step and ``optimizer.step()`` can
take turns and state_dicts interchange.

Parameters are the model's in the order ``w_1, b_1, …, w_L, b_L`` (None for absent biases).
"""
from __future__ import annotations

import torch

from pyfused.optim import FusedAdam, FusedAdamW, FusedSGD

SGD_TYPES = (FusedSGD, torch.optim.SGD)
ADAM_TYPES = (FusedAdam, torch.optim.Adam)  # torch.optim.AdamW and FusedAdamW are subclasses


class OptimizerBinding:
    """The optimizer of a FusedTrainStep, seen per parameter (validated at construction)."""

    def __init__(self, optimizer, params, names) -> None:
        if isinstance(optimizer, SGD_TYPES):
            self.kind = "sgd"
        elif isinstance(optimizer, ADAM_TYPES):
            self.kind = "adam"
        else:
            raise TypeError(f"optimizer must be a pyfused.FusedSGD, FusedAdam or FusedAdamW (or torch.optim.SGD, "
                            f"Adam or AdamW), got {type(optimizer).__name__}")
        self.optimizer, self.params = optimizer, params
        owner = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for name, p in zip(names, params):
            if p is None:
                continue
            if id(p) not in owner:
                raise ValueError(f"model parameter {name} is not in the optimizer's param groups")
            group = owner[id(p)]
            if group.get("differentiable", False):
                raise ValueError("FusedTrainStep does not support differentiable=True optimizers")
        self.groups = [None if p is None else owner[id(p)] for p in params]

    def decoupled(self, group) -> bool:
        return isinstance(self.optimizer, FusedAdamW) or bool(group.get("decoupled_weight_decay", False))

    def has_state(self, i) -> bool:
        """Whether parameter ``i`` has state the update reads: SGD's momentum buffer, Adam's moments."""
        group = self.groups[i]
        return group is not None and (self.kind == "adam" or group["momentum"] != 0)

    def amsgrad(self, i) -> bool:
        group = self.groups[i]
        return self.kind == "adam" and group is not None and bool(group["amsgrad"])

    def row(self, i, lr: float) -> tuple:
        """Parameter ``i``'s hyper-parameter row (:mod:`pyfused.kernels.optimizers` layouts) with ``lr``."""
        group = self.groups[i]
        sign = -1.0 if group["maximize"] else 1.0
        if self.kind == "sgd":
            return (lr, float(group["momentum"]), float(group["dampening"]), float(group["weight_decay"]),
                    float(bool(group["nesterov"])), sign)
        beta1, beta2 = group["betas"]
        return (lr, float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), sign,
                float(self.decoupled(group)))

    def states(self, i, step_device):
        """``(s1, s2, s3, step, new)`` of parameter ``i``, made where missing (``new``: an SGD momentum buffer made
        now, zeros, whose first update is ``buf = d``). SGD: the momentum buffer (None at momentum 0). Adam:
        exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad) and the float32 step, moved to ``step_device``."""
        p = self.params[i]
        state = self.optimizer.state[p]
        if self.kind == "sgd":
            if not self.has_state(i):
                return None, None, None, None, False
            buf = state.get("momentum_buffer")
            if buf is None:
                state["momentum_buffer"] = torch.zeros_like(p)
                return state["momentum_buffer"], None, None, None, True
            _check_like(buf, p, "momentum_buffer", i)
            return buf, None, None, None, False
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        if self.amsgrad(i) and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(p)
        step = state["step"]
        if not isinstance(step, torch.Tensor) or step.device != torch.device(step_device) \
                or step.dtype != torch.float32:
            step = state["step"] = torch.tensor(float(step), dtype=torch.float32, device=step_device)
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if name in state:
                _check_like(state[name], p, name, i)
        return state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"), step, False


def _check_like(t, p, name, i) -> None:
    if t.shape != p.shape or t.dtype != p.dtype or t.device != p.device or not t.is_contiguous():
        raise RuntimeError(f"{name} of parameter {i} must be a contiguous tensor like the parameter "
                           f"({tuple(p.shape)}, {p.dtype}, {p.device}), got {tuple(t.shape)}, {t.dtype}, {t.device}")
