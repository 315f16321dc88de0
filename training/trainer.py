"""The training loop over a denoiser: LoRA (+ optional token [V]), reconstruction, DreamBooth prior preservation,
SuDe and PALP terms; deterministic from a seed; resumable.

A host supplies:
- ``denoiser(x_t, t, context) -> prediction`` with a ``schedule`` attribute (:class:`~.schedule.NoiseSchedule`, which
  says whether the prediction is eps, x0 or v), computing with the LoRA deltas of a :class:`~.lora.LoRASet` that the
  host attached (diffusers: :func:`.lora.attach`; ComfyUI: ``ModelPatcher.add_weight_wrapper``);
- ``encode_text(prompts, token) -> conditioning``: the frozen text encoder; ``token`` is the trainable [V]
  embedding ``(n_vectors, width)`` or None, used wherever the placeholder appears in a prompt; the conditioning is
  a context ``(B, L, D)`` or a tuple of batch-first tensors (:mod:`.conditioning`; SDXL adds the pooled/size vector);
- latents of the subject images (``(N, C, H, W)``, already scaled as the denoiser expects).

One optimizer step, per micro-batch (prompts as in the SuDe reference / PALP paper):
1. grad forward, batched: subject latents at x_t on the instance prompt (+ class latents on the class prompt when
   prior preservation is on);
2. one no-grad forward with the LoRA on, batched: SuDe's class-prompt and empty-prompt predictions at x_t, PALP's
   personalized prediction and its uncond at x-hat_t (the re-noised x0-hat of step 1, same t and noise);
3. one no-grad forward with the LoRA off (the frozen base): PALP's clean target prompt and its uncond at x-hat_t.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from . import conditioning as cond
from . import export
from .lora import ATTENTION_TARGETS, DEFAULT_RANK, LoRASet
from .losses import (
    PALP_ALPHA,
    PALP_BETA,
    palp_loss,
    palp_residual,
    prior_preservation_loss,
    reconstruction_loss,
    sude_loss,
)
from .schedule import NoiseSchedule

log = logging.getLogger("personalize")

TERMS = ("reconstruction", "prior", "sude", "palp")
PRECISIONS = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# DreamBooth LoRA defaults (diffusers examples/dreambooth/train_dreambooth_lora.py): lr 1e-4, max_grad_norm 1.0,
# AdamW weight decay 1e-2.
DEFAULT_LR = 1e-4
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
# PALP's personalization prompt is "A photo of [V]" (paper Sec. 4); SuDe's are "photo of a sks <class>" and
# "photo of a <class>" (reference configs). {token} and {class_word} are filled in.
INSTANCE_PROMPT = "a photo of {token} {class_word}"
CLASS_PROMPT = "a photo of {class_word}"


@dataclass
class TrainConfig:
    steps: int = 500
    learning_rate: float = DEFAULT_LR
    token_learning_rate: float | None = None  # None: learning_rate
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    rank: int = DEFAULT_RANK
    alpha: float | None = None  # None: rank (scale 1)
    targets: Sequence[str] = ATTENTION_TARGETS
    token: str = "sks"
    class_word: str = "person"
    train_token: bool = False
    instance_prompt: str = INSTANCE_PROMPT
    class_prompt: str = CLASS_PROMPT
    # term weights; 0 switches a term off. "sude" is SuDe's w_s.
    reconstruction_weight: float = 1.0
    prior_weight: float = 0.0
    sude_weight: float = 0.0
    palp_weight: float = 0.0
    palp_prompts: Sequence[str] = ()
    palp_alpha: float = PALP_ALPHA
    palp_beta: float = PALP_BETA
    palp_rescale: bool = True
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    max_grad_norm: float = MAX_GRAD_NORM
    weight_decay: float = WEIGHT_DECAY

    def __post_init__(self):
        self.targets = tuple(self.targets)
        self.palp_prompts = tuple(self.palp_prompts)
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"mixed_precision must be one of {list(PRECISIONS)}, got {self.mixed_precision!r}")
        if self.palp_weight and not self.palp_prompts:
            raise ValueError("PALP is on (palp_weight > 0) but no target prompt was given: add at least one clean "
                             "prompt without the subject token, e.g. 'a sketch of a cat'")
        for name in ("steps", "batch_size", "grad_accumulation", "rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # NaN passes every min/max check of a node input: refuse it here
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} is {value}: give a finite number")
        for name in ("learning_rate", "token_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

    @classmethod
    def from_dict(cls, d: Mapping) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(d))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"], d["palp_prompts"] = list(self.targets), list(self.palp_prompts)
        return d

    def fill(self, prompt: str) -> str:
        """``{token}`` and ``{class_word}`` filled in; any other text, braces included (``{subject}``, dynamic-prompt
        syntax), is kept as it is."""
        return prompt.replace("{token}", self.token).replace("{class_word}", self.class_word)

    def weights(self) -> dict[str, float]:
        return {"reconstruction": self.reconstruction_weight, "prior": self.prior_weight, "sude": self.sude_weight,
                "palp": self.palp_weight}


# Options that must match between a saved state and the run resuming it.
_RESUME_KEYS = ("rank", "alpha", "targets", "train_token", "token")


class Trainer:
    def __init__(self, denoiser: Callable, lora: LoRASet, encode_text: Callable, latents: torch.Tensor,
                 config: TrainConfig, prior_latents: torch.Tensor | None = None, token_init: torch.Tensor | None = None,
                 device: torch.device | str | None = None):
        self.denoiser, self.lora, self.encode_text, self.config = denoiser, lora, encode_text, config
        self.schedule: NoiseSchedule = denoiser.schedule
        self.device = torch.device(device) if device is not None else latents.device
        self.latents = latents.detach().float().to(self.device)
        if self.latents.ndim != 4 or self.latents.shape[0] < 1:
            raise ValueError(f"subject latents must be (N, C, H, W) with N >= 1, got {tuple(self.latents.shape)}")
        if config.prior_weight and (prior_latents is None or prior_latents.shape[0] == 0):
            raise ValueError("prior preservation is on (prior_weight > 0) but no class images were given or generated")
        self.prior_latents = None if prior_latents is None else prior_latents.detach().float().to(self.device)
        self.token = None
        if config.train_token:
            if token_init is None:
                raise ValueError("train_token is on but no initial embedding was given (use the class word's embedding)")
            self.token = torch.nn.Parameter(token_init.detach().float().clone().reshape(-1, token_init.shape[-1]).to(self.device))
        groups = [{"params": list(lora.parameters()), "lr": config.learning_rate}]
        if self.token is not None:
            groups.append({"params": [self.token], "lr": config.token_learning_rate or config.learning_rate,
                           "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.dtype = PRECISIONS[config.mixed_precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == torch.float16 else None
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._contexts: dict[str, torch.Tensor] = {}
        self.lora.requires_grad_(True)
        # ``grad_sync(params)``: averages gradients over processes (multi-GPU); None on one device
        self.grad_sync: Callable[[list], None] | None = None

    # -----------------------------------------------------------------------------------------------------------
    # text

    def context(self, prompts: Sequence[str], grad: bool = False):
        """Conditioning of ``prompts`` (batched); cached unless the trained token is in the prompt, which is encoded
        with the current token (with grad if ``grad``), once per distinct prompt."""
        out, fresh = [], {}
        for p in prompts:
            if self.token is not None and self.config.token in p:
                if p not in fresh:
                    with contextlib.nullcontext() if grad else torch.no_grad():
                        fresh[p] = self.encode_text([p], self.token if grad else self.token.detach())
                out.append(fresh[p])
                continue
            if p not in self._contexts:
                with torch.no_grad():
                    self._contexts[p] = cond.detach(self.encode_text([p], None))
            out.append(self._contexts[p])
        return cond.to(cond.cat(out), self.device)

    # -----------------------------------------------------------------------------------------------------------
    # one step

    def _predict(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            pred = self.denoiser(x, t, ctx)
        return self.schedule.to_eps(pred.float(), x, t)

    def _randint(self, high: int, n: int) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=self.generator)

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator).to(like)

    def micro_step(self) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch (graph attached), per term, already weighted."""
        cfg, sch, T = self.config, self.schedule, self.schedule.timesteps
        w = cfg.weights()
        B = cfg.batch_size
        x0 = self.latents[self._randint(self.latents.shape[0], B).to(self.device)]
        t = self._randint(T, B).to(self.device)
        eps = self._randn(x0)
        x_t = sch.q_sample(x0, eps, t)
        instance = cfg.fill(cfg.instance_prompt)
        ctx_inst = self.context([instance] * B, grad=True)

        xs, ts, ctxs = [x_t], [t], [ctx_inst]
        if w["prior"]:
            xp0 = self.prior_latents[self._randint(self.prior_latents.shape[0], B).to(self.device)]
            tp = self._randint(T, B).to(self.device)
            eps_p = self._randn(xp0)
            xs.append(sch.q_sample(xp0, eps_p, tp))
            ts.append(tp)
            ctxs.append(self.context([cfg.fill(cfg.class_prompt)] * B))
        pred = self._predict(torch.cat(xs), torch.cat(ts), cond.cat(ctxs))
        eps_s = pred[:B]

        terms = {"reconstruction": w["reconstruction"] * reconstruction_loss(eps_s, eps).mean()}
        if w["prior"]:
            terms["prior"] = w["prior"] * prior_preservation_loss(pred[B:], eps_p).mean()

        # no-grad predictions, LoRA on (SuDe: same model, not a frozen copy; PALP: the personalized branch)
        on_x, on_t, on_ctx = [], [], []
        empty = self.context([""] * B)
        if w["sude"]:
            on_x += [x_t, x_t]
            on_t += [t, t]
            on_ctx += [self.context([cfg.fill(cfg.class_prompt)] * B), empty]
        if w["palp"]:
            x0_hat = sch.x0_from_eps(x_t, eps_s.detach(), t)
            xh_t = sch.q_sample(x0_hat, eps, t)  # same noise, same t (PALP Sec. 4)
            target_idx = self._randint(len(cfg.palp_prompts), B).tolist()
            targets = self.context([cfg.palp_prompts[i] for i in target_idx])
            on_x += [xh_t, xh_t]
            on_t += [t, t]
            on_ctx += [cond.detach(ctx_inst), empty]  # same prompt, same token: no second text-encoder pass
        if on_x:
            with torch.no_grad():
                on = self._predict(torch.cat(on_x), torch.cat(on_t), cond.cat(on_ctx)).chunk(len(on_x))
            if w["palp"]:
                with torch.no_grad(), self.lora.disabled():
                    frozen_c, frozen_u = self._predict(torch.cat([xh_t, xh_t]), torch.cat([t, t]),
                                                       cond.cat([targets, empty])).chunk(2)
                residual = palp_residual(frozen_c, frozen_u, on[-2], on[-1], cfg.palp_alpha, cfg.palp_beta)
                terms["palp"] = w["palp"] * palp_loss(eps_s, residual, t, sch, rescale=cfg.palp_rescale).mean()
            if w["sude"]:
                terms["sude"] = sude_loss(eps_s, on[0], on[1], t, sch, weight=w["sude"]).mean()
        return terms

    def train_step(self) -> dict[str, float]:
        """One optimizer step (``grad_accumulation`` micro-batches); returns the mean of each term."""
        cfg = self.config
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for _ in range(cfg.grad_accumulation):
            terms = self.micro_step()
            loss = sum(terms.values()) / cfg.grad_accumulation
            (self.scaler.scale(loss) if self.scaler else loss).backward()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accumulation
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.grad_sync is not None:  # before unscaling: an overflow on one process then skips the step on all
            self.grad_sync(params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        # the total gradient norm (clipped when max_grad_norm > 0; with inf nothing changes): one host sync
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0
                                              else math.inf)
        finite_loss = all(math.isfinite(v) for v in sums.values())
        if not finite_loss or (self.scaler is None and not math.isfinite(float(norm))):  # fp16: the scaler skips
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"step {self.step + 1}: the {'loss' if not finite_loss else 'gradient'} is NaN or Inf "
                f"({', '.join(f'{k} {v:.4g}' for k, v in sums.items())}); the update was not applied, so the LoRA (and "
                f"token) keep their step-{self.step} values and the files saved so far stay valid. Causes: NaN or Inf in "
                "the inputs (subject or class images), a learning rate too high, or fp16 overflow (use bf16 or no "
                "mixed precision)")
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
        """Steps until ``self.step == until`` (default ``config.steps``). ``callback(step, losses)`` after each step
        may raise to stop (the state stays consistent: it is called between steps)."""
        until = self.config.steps if until is None else until
        while self.step < until:
            losses = self.train_step()  # raises before the update when the loss or the gradient is not finite
            if callback is not None:
                callback(self.step, losses)

    # -----------------------------------------------------------------------------------------------------------
    # state

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"lora.{k}": v for k, v in self.lora.lora_state().items()}
        if self.token is not None:
            tensors["token"] = self.token.detach()
        opt = self.optimizer.state_dict()
        for idx, st in opt["state"].items():
            for name, value in st.items():
                tensors[f"optim.{idx}.{name}"] = torch.as_tensor(value)
        tensors["rng.trainer"] = self.generator.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.scaler is not None:
            tensors["amp.scale"] = torch.as_tensor(self.scaler.get_scale())
        info = {"step": self.step, "config": self.config.to_dict(), "param_groups": opt["param_groups"],
                "history": self.history}
        return tensors, info

    def save(self, path: str, overwrite: bool = False) -> str:
        tensors, info = self.state_tensors()
        return export.save_state(tensors, info, path, overwrite=overwrite)

    def load(self, path: str) -> None:
        """Resume from a state written by :meth:`save` (LoRA, token, optimizer, step, RNG, loss history)."""
        tensors, info = export.load_state(path)
        saved = info.get("config", {})
        for key in _RESUME_KEYS:
            mine = self.config.to_dict()[key]
            if key in saved and saved[key] != mine:
                raise ValueError(f"cannot resume from {path}: it was trained with {key}={saved[key]!r}, this run has "
                                 f"{key}={mine!r}; use the same setting or start a new run")
        self.lora.load_lora_state({k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")})
        if self.token is not None:
            with torch.no_grad():
                self.token.copy_(tensors["token"].reshape(self.token.shape))
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        self.optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        for g in self.optimizer.param_groups:  # this run's learning rate wins (lets a user lower it on resume)
            g["lr"] = self.config.learning_rate if g is self.optimizer.param_groups[0] else (
                self.config.token_learning_rate or self.config.learning_rate)
        self.generator.set_state(tensors["rng.trainer"])
        torch.set_rng_state(tensors["rng.torch"])
        if self.scaler is not None and "amp.scale" in tensors:
            self.scaler.update(float(tensors["amp.scale"]))
        self.step = int(info["step"])
        self.history = list(info.get("history", []))
        log.info("resumed from %s at step %d", path, self.step)


def losses_table(history: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    """Per-term loss curves from a trainer history (missing terms are absent, not zero)."""
    out: dict[str, list[float]] = {}
    for row in history:
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    return out


__all__ = ["TrainConfig", "Trainer", "TERMS", "losses_table"]
