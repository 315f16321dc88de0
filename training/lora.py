"""Trainable low-rank deltas for named weights, with one on/off switch for all of them.

A :class:`LoRADelta` is a function ``weight -> weight + (alpha / rank) * up @ down``: the form ComfyUI's
``ModelPatcher.add_weight_wrapper`` expects, and the form LoRA loaders apply (``lora_up.weight``, ``lora_down.weight``,
``alpha``; Hu et al. 2021, scale alpha / r). The frozen base model is the same model with the switch off: no second
copy of the weights.
"""
from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

# Attention projections of SD UNet transformer blocks (LDM and diffusers name them alike): q, k, v and the output
# projection of self- (attn1) and cross-attention (attn2). PALP: "LoRA on self- and cross-attention projection
# matrices" (paper Sec. 4); DreamBooth-LoRA (diffusers train_dreambooth_lora.py) targets the same four.
ATTENTION_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                     "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
# Further selectable targets inside transformer blocks (feed-forward, projections in/out of the transformer).
EXTRA_TARGETS = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
# PALP's rank (paper Appendix C: LoRA r = 32).
DEFAULT_RANK = 32


class LoRASwitch:
    """Shared on/off state of a set of deltas."""

    def __init__(self):
        self.on = True


class LoRADelta(nn.Module):
    """``weight + scale * up @ down`` (``scale = alpha / rank``) for a Linear or Conv weight, when the switch is on.

    ``down``: ``(rank, in_features * prod(kernel))`` random (Kaiming-uniform as PEFT/kohya), ``up``: ``(out, rank)``
    zeros, so training starts from the base model.
    """

    def __init__(self, weight_shape: tuple[int, ...], rank: int, alpha: float, switch: LoRASwitch,
                 generator: torch.Generator | None = None):
        super().__init__()
        out_f, in_f = weight_shape[0], int(math.prod(weight_shape[1:]))
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        rank = min(rank, out_f, in_f)
        self.shape, self.rank, self.alpha, self.switch = tuple(weight_shape), rank, float(alpha), switch
        bound = 1 / math.sqrt(in_f)  # kaiming_uniform(a=sqrt(5)) bound, as nn.Linear's default init
        down = (torch.rand(rank, in_f, generator=generator) * 2 - 1) * bound
        self.down = nn.Parameter(down)
        self.up = nn.Parameter(torch.zeros(out_f, rank))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        return (self.scale * (self.up @ self.down)).reshape(self.shape)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.switch.on:
            return weight
        return weight + self.delta().to(dtype=weight.dtype, device=weight.device)

    # ComfyUI's model management asks weight functions to move with the model.
    def move_to(self, device=None) -> int:
        if device is not None:
            self.to(device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


class LoRASet(nn.Module):
    """Named :class:`LoRADelta` s (names are the host's module paths) sharing one switch."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], rank: int = DEFAULT_RANK, alpha: float | None = None,
                 seed: int = 0):
        super().__init__()
        if not shapes:
            raise ValueError("no LoRA target found in the model: check the target names (e.g. attn1.to_q, attn2.to_k)")
        self.switch = LoRASwitch()
        self.rank, self.alpha = int(rank), float(rank if alpha is None else alpha)
        g = torch.Generator().manual_seed(int(seed))
        self.names = sorted(shapes)
        self.deltas = nn.ModuleDict({_safe(n): LoRADelta(tuple(shapes[n]), self.rank, self.alpha, self.switch, g)
                                     for n in self.names})

    def __getitem__(self, name: str) -> LoRADelta:
        return self.deltas[_safe(name)]

    def items(self) -> Iterable[tuple[str, LoRADelta]]:
        return ((n, self.deltas[_safe(n)]) for n in self.names)

    @contextlib.contextmanager
    def disabled(self):
        """Predictions of the frozen base model inside the block."""
        before, self.switch.on = self.switch.on, False
        try:
            yield
        finally:
            self.switch.on = before

    def lora_state(self) -> dict[str, torch.Tensor]:
        """``{name}.lora_up.weight / .lora_down.weight / .alpha`` (the stock LoRA layout, host module names)."""
        out = {}
        for name, d in self.items():
            out[f"{name}.lora_up.weight"] = d.up.detach().reshape(d.shape[0], d.rank, *([1] * (len(d.shape) - 2)))
            out[f"{name}.lora_down.weight"] = d.down.detach().reshape(d.rank, *d.shape[1:])
            out[f"{name}.alpha"] = torch.tensor(d.alpha)
        return out

    def load_lora_state(self, state: Mapping[str, torch.Tensor]) -> None:
        saved = {k[: -len(".lora_up.weight")] for k in state if k.endswith(".lora_up.weight")}
        mine = set(self.names)
        if saved != mine:
            raise ValueError(f"the saved LoRA covers {len(saved)} layers, {len(saved & mine)} of them among this model's "
                             f"{len(mine)} targets: it was trained on another model or with other targets; resume with "
                             "the same model and targets, or start a new run")
        with torch.no_grad():
            for name, d in self.items():
                up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
                if down.shape[0] != d.rank:
                    raise ValueError(f"the saved LoRA has rank {down.shape[0]}, this run rank {d.rank}; use the same rank")
                if up.numel() != d.up.numel() or down.numel() != d.down.numel():
                    raise ValueError(f"layer {name} is {tuple(up.shape)} x {tuple(down.shape)} in the saved LoRA but "
                                     f"{tuple(d.up.shape)} x {tuple(d.down.shape)} here: it was trained on another model")
                d.up.copy_(up.reshape(d.up.shape))
                d.down.copy_(down.reshape(d.down.shape))


def _safe(name: str) -> str:
    return name.replace(".", "::")


def select_targets(names: Iterable[str], targets: Iterable[str] = ATTENTION_TARGETS) -> list[str]:
    """Module paths among ``names`` that end with one of ``targets`` (``"attn1.to_q"``, ...) or match a target given
    as a regular expression ``re:<pattern>``."""
    targets = tuple(targets)
    plain = tuple("." + t for t in targets if not t.startswith("re:"))
    patterns = [re.compile(t[3:]) for t in targets if t.startswith("re:")]
    return [n for n in names if n.endswith(plain) or any(p.search(n) for p in patterns)]


# ---------------------------------------------------------------------------------------------------------------
# Attaching deltas to a plain torch model (diffusers): the module computes with ``delta(weight)``.


def attach(model: nn.Module, lora: LoRASet) -> None:
    """Make each named Linear / Conv2d of ``model`` use ``lora[name](weight)`` in its forward."""
    modules = dict(model.named_modules())
    for name, delta in lora.items():
        m = modules.get(name)
        if isinstance(m, nn.Linear):
            m.forward = _linear_forward(m, delta)
        elif isinstance(m, nn.Conv2d):
            m.forward = _conv_forward(m, delta)
        else:
            raise ValueError(f"LoRA target {name!r} is a {type(m).__name__}, not a Linear or Conv2d of the model")


def _linear_forward(m: nn.Linear, delta: LoRADelta):
    def forward(x):
        return F.linear(x, delta(m.weight), m.bias)
    return forward


def _conv_forward(m: nn.Conv2d, delta: LoRADelta):
    def forward(x):
        return m._conv_forward(x, delta(m.weight), m.bias)
    return forward


def shapes_of(model: nn.Module, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    modules = dict(model.named_modules())
    return {n: tuple(modules[n].weight.shape) for n in names}
