"""E4T training on any host: domain pretraining (encoder head + weight offsets, frozen UNet, many images of one domain)
and test-time tuning (one image, 5-15 steps; the reference also trains every UNet weight). One step is the reference's
(mkshing/e4t-diffusion ``pretrain_e4t.py`` / ``tuning_e4t.py``):

1. ``t ~ U{0..T-1}``, ``eps ~ N(0, I)``, ``x_t = q_sample(x0, eps, t)`` per sample;
2. UNet features of ``x_t`` at ``t`` with the empty prompt (the model being trained: offsets and deltas included);
3. ``e = E(class) + scale * head(clip_inputs, features)``, written into the placeholder slot of a prompt drawn from the
   templates; the text encoder runs on it;
4. ``loss = mean((eps_hat - eps)^2) + reg_lambda * sum(e^2)`` (the sum runs over the batch too, as the reference's);
5. AdamW (torch defaults, weight decay 0.01) over the head, the offsets and the host's extra parameters; gradient
   clipping at ``max_grad_norm`` (tuning 1.0, pretraining none).

A host supplies (plain callables, so the ComfyUI node and the diffusers CLI share this loop):

- ``denoiser(x_t, t, context) -> prediction`` with a ``schedule`` (:class:`~.schedule.NoiseSchedule`);
- ``features(x_t, t) -> (B, channels)``: the pooled down+mid features (:func:`~..models.e4t.pool_features`);
- ``encode(prompts, e) -> context``: the prompts with ``e[i]`` in prompt i's placeholder slot, with autograd;
- the trainable modules: the head, the offsets and any further ones (``extra``: full-size UNet deltas, a LoRA).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..models import e4t
from . import export
from .losses import reconstruction_loss

log = logging.getLogger("personalize")

PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class E4TTrainConfig:
    steps: int = e4t.TUNE_STEPS
    learning_rate: float = e4t.LEARNING_RATE
    batch_size: int = e4t.BATCH_SIZE
    reg_lambda: float = e4t.TUNE_REG_LAMBDA
    domain_embed_scale: float = e4t.DOMAIN_EMBED_SCALE
    max_grad_norm: float = e4t.MAX_GRAD_NORM  # 0: no clipping (pretraining)
    weight_decay: float = 1e-2  # torch AdamW default, which both reference scripts use
    seed: int = 0
    templates: Sequence[str] = e4t.FACE_TEMPLATES
    placeholder: str = "{placeholder_token}"
    mixed_precision: str = "no"
    mode: str = "tune"  # what is trained, for the state's resume check: "tune", "tune-light", "pretrain"

    def __post_init__(self):
        self.templates = tuple(self.templates)
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}")
        for name in ("steps", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} is {value}: give a finite number")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.templates or any(self.placeholder not in t for t in self.templates):
            raise ValueError(f"every prompt template must hold {self.placeholder}; got {list(self.templates)}")

    @classmethod
    def from_dict(cls, d: Mapping) -> E4TTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown E4T training option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["templates"] = list(self.templates)
        return d


class E4TTrainer:
    """The loop; ``latents`` ``(N, C, H, W)`` and ``clip_inputs`` ``(N, n, hidden)`` of the same N images (tuning:
    N copies of one image), ``class_embed`` ``(word_dim,)``. ``sample(batch, generator) -> indices`` picks the images
    of a step (default: uniformly at random). ``batch_fn(batch, generator) -> (x0, clip_inputs)`` replaces both
    (pretraining: fresh crops of a dataset at every step; ``latents`` / ``clip_inputs`` may then be None)."""

    def __init__(self, denoiser: Callable, features: Callable, encode: Callable, head: e4t.E4THead,
                 offsets: e4t.OffsetSet | None, latents: torch.Tensor, clip_inputs: torch.Tensor, class_embed: torch.Tensor,
                 config: E4TTrainConfig, extra: Mapping[str, nn.Module] | None = None, device=None,
                 sample: Callable | None = None, batch_fn: Callable | None = None):
        self.denoiser, self.features, self.encode, self.config = denoiser, features, encode, config
        self.schedule = denoiser.schedule
        self.device = torch.device(device) if device is not None else (latents.device if latents is not None else
                                                                       torch.device("cpu"))
        self.batch_fn = batch_fn
        if batch_fn is None:
            if latents is None or clip_inputs is None or latents.ndim != 4 or latents.shape[0] != clip_inputs.shape[0]:
                raise ValueError(f"latents {None if latents is None else tuple(latents.shape)} and CLIP inputs "
                                 f"{None if clip_inputs is None else tuple(clip_inputs.shape)} must hold the same images")
            self.latents = latents.detach().float().to(self.device)
            self.clip_inputs = clip_inputs.detach().float().to(self.device)
        self.class_embed = class_embed.detach().float().reshape(-1).to(self.device)
        self.modules = {"head": head, **({"offsets": offsets} if offsets is not None else {}), **dict(extra or {})}
        for m in self.modules.values():
            m.requires_grad_(True)
        self.params = [p for m in self.modules.values() for p in m.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.dtype = PRECISIONS[config.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.sample = sample
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.grad_sync: Callable[[list], None] | None = None  # averages gradients over processes (multi-GPU)

    def _autocast(self):
        return (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                else contextlib.nullcontext())

    def micro_step(self) -> dict[str, torch.Tensor]:
        cfg, sch = self.config, self.schedule
        B = cfg.batch_size
        if self.batch_fn is not None:
            x0, clip_in = self.batch_fn(B, self.generator)
            x0, clip_in = x0.detach().float().to(self.device), clip_in.detach().float().to(self.device)
        else:
            if self.sample is not None:
                idx = torch.as_tensor(self.sample(B, self.generator))
            else:
                idx = torch.randint(0, self.latents.shape[0], (B,), generator=self.generator)
            idx = idx.to(self.device)
            x0, clip_in = self.latents[idx], self.clip_inputs[idx]
        t = torch.randint(0, sch.timesteps, (B,), generator=self.generator).to(self.device)
        eps = torch.randn(x0.shape, generator=self.generator).to(x0)
        x_t = sch.q_sample(x0, eps, t)
        prompts = [cfg.templates[int(i)] for i in torch.randint(0, len(cfg.templates), (B,), generator=self.generator)]
        with self._autocast():
            feats = self.features(x_t, t)
            enc = self.modules["head"](clip_in, feats.float())
        e = e4t.domain_embedding(self.class_embed, enc.float(), cfg.domain_embed_scale)
        with self._autocast():
            ctx = self.encode(prompts, e)
            pred = self.denoiser(x_t, t, ctx)
        eps_hat = sch.to_eps(pred.float(), x_t, t)
        return {"diffusion": reconstruction_loss(eps_hat, eps).mean(), "reg": cfg.reg_lambda * e4t.regularizer(e)}

    def train_step(self) -> dict[str, float]:
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        terms = self.micro_step()
        loss = sum(terms.values())
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        sums = {k: float(v.detach()) for k, v in terms.items()}
        if self.grad_sync is not None:
            self.grad_sync(self.params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        if not all(math.isfinite(v) for v in sums.values()) or (self.scaler is None and not math.isfinite(float(norm))):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"E4T step {self.step + 1}: the loss or gradient is NaN or Inf ({', '.join(f'{k} {v:.4g}' for k, v in sums.items())}); "
                f"the update was not applied: the weights keep their step-{self.step} values. Causes: NaN in the image, "
                "a learning rate too high, or fp16 overflow (use bf16 or no mixed precision)")
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step += 1
        sums["total"] = sum(sums.values())
        self.history.append(sums)
        return sums

    def train(self, until: int | None = None, callback: Callable[[int, dict], None] | None = None) -> None:
        until = self.config.steps if until is None else until
        while self.step < until:
            losses = self.train_step()
            if callback is not None:
                callback(self.step, losses)

    # -----------------------------------------------------------------------------------------------------------
    # state

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"{name}.{k}": v.detach() for name, m in self.modules.items() for k, v in m.state_dict().items()}
        for idx, st in self.optimizer.state_dict()["state"].items():
            for name, value in st.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        tensors["rng.trainer"] = self.generator.get_state()  # every draw of the loop comes from this generator
        if self.scaler is not None:
            tensors["amp.scale"] = torch.as_tensor(self.scaler.get_scale())
        info = {"step": self.step, "config": self.config.to_dict(), "method": "e4t",
                "param_groups": self.optimizer.state_dict()["param_groups"], "history": self.history}
        return tensors, info

    def save(self, path: str, overwrite: bool = False) -> str:
        tensors, info = self.state_tensors()
        return export.save_state(tensors, info, path, overwrite=overwrite)

    def load(self, path: str) -> None:
        """Resume from a state :meth:`save` wrote: every trained tensor, the optimizer, the step, the RNG, the losses."""
        tensors, info = export.load_state(path)
        if info.get("method") != "e4t":
            raise ValueError(f"{path} is not an E4T training state (it was written by another trainer)")
        saved = info.get("config", {})
        for key in ("mode", "batch_size"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(f"cannot resume from {path}: it was trained with {key}={saved[key]!r}, this run has "
                                 f"{key}={getattr(self.config, key)!r}; use the same setting or start a new run")
        for name, m in self.modules.items():
            own = m.state_dict()
            part = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            if set(part) != set(own) or any(part[k].shape != own[k].shape for k in own):
                raise ValueError(f"cannot resume from {path}: its {name} does not match this run's (another model, or "
                                 "another E4T encoder); start a new run")
            with torch.no_grad():
                for k, v in own.items():
                    v.copy_(part[k])
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        for g in self.optimizer.param_groups:
            g["lr"] = self.config.learning_rate
        self.generator.set_state(tensors["rng.trainer"])
        if self.scaler is not None and "amp.scale" in tensors:
            self.scaler.update(float(tensors["amp.scale"]))
        self.step = int(info["step"])
        self.history = list(info.get("history", []))
        log.info("E4T: resumed from %s at step %d", path, self.step)


class FullDeltas(nn.Module):
    """A trainable full-size additive delta per named weight (fp32 zeros): ``W + D``. The gradient of D equals the
    gradient of W, so training D follows full fine-tuning without changing the shared W (the reference's tuning
    trains ``list(unet.parameters())``)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]]):
        super().__init__()
        self.names = sorted(shapes)
        self.deltas = nn.ParameterDict({n.replace(".", "::"): nn.Parameter(torch.zeros(shapes[n])) for n in self.names})

    def __getitem__(self, name: str) -> nn.Parameter:
        return self.deltas[name.replace(".", "::")]

    def items(self):
        return ((n, self[n]) for n in self.names)

    def move_to(self, device=None) -> int:
        if device is not None:
            self.to(device)
        return sum(p.numel() * p.element_size() for p in self.parameters())


def adamw_bytes(n_params: int) -> int:
    """fp32 bytes of trainable parameters under AdamW: the values, their gradients and two moments."""
    return 4 * 4 * int(n_params)


__all__ = ["E4TTrainConfig", "E4TTrainer", "FullDeltas", "adamw_bytes"]
