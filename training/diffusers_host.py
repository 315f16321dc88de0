"""The training core on diffusers: a UNet2DConditionModel as a denoiser, a CLIP text encoder with a trainable [V],
LoRA attached to the UNet's modules. diffusers / transformers are imported by the caller's objects only."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import export
from .lora import LoRASet, attach, select_targets, shapes_of
from .schedule import NoiseSchedule

# diffusers scheduler prediction_type -> NoiseSchedule.prediction
PREDICTION_TYPES = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}


class DiffusersDenoiser:
    """``denoiser(x_t, t, context)`` over a diffusers ``UNet2DConditionModel``."""

    def __init__(self, unet, schedule: NoiseSchedule):
        self.unet, self.schedule = unet, schedule

    @classmethod
    def from_scheduler(cls, unet, scheduler) -> DiffusersDenoiser:
        pt = scheduler.config.get("prediction_type", "epsilon")
        if pt not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type {pt!r} is not supported (expected one of {list(PREDICTION_TYPES)})")
        return cls(unet, NoiseSchedule(scheduler.alphas_cumprod, PREDICTION_TYPES[pt]))

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        p = next(self.unet.parameters())
        return self.unet(x_t.to(p.dtype), t, encoder_hidden_states=context.to(p.dtype)).sample

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    @property
    def layers_per_block(self) -> int:
        lpb = self.unet.config.layers_per_block
        return lpb if isinstance(lpb, int) else lpb[0]


def unet_lora(unet, targets: Sequence[str], rank: int, alpha: float | None, seed: int) -> LoRASet:
    """A LoRA set on ``unet``'s modules matching ``targets``, attached (the UNet's own weights frozen)."""
    unet.requires_grad_(False)
    names = select_targets([n for n, _ in unet.named_modules()], targets)
    lora = LoRASet(shapes_of(unet, names), rank=rank, alpha=alpha, seed=seed)
    attach(unet, lora)
    return lora


def ldm_mapper(denoiser: DiffusersDenoiser):
    lpb = denoiser.layers_per_block
    return lambda name: export.diffusers_to_ldm_path(name, lpb)


class ClipTextEncoder:
    """``encode(prompts, token) -> last hidden states (B, 77, D)`` of a transformers CLIPTextModel (SD1.x's
    conditioning). The placeholder word is added to the tokenizer; its input embedding is replaced by ``token``
    (differentiable) through a forward hook on the token-embedding layer, so the encoder's weights stay frozen."""

    def __init__(self, tokenizer, text_encoder, placeholder: str | None = None, n_vectors: int = 1):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.text_encoder.requires_grad_(False)
        self.placeholder, self.ids = placeholder, []
        self._token = None
        if placeholder is not None:
            words = [placeholder] + [f"{placeholder}_{i}" for i in range(1, n_vectors)]
            tokenizer.add_tokens(words)
            self.ids = tokenizer.convert_tokens_to_ids(words)
            text_encoder.resize_token_embeddings(len(tokenizer))
            self.text_encoder.get_input_embeddings().register_forward_hook(self._hook)

    def word_embedding(self, word: str) -> torch.Tensor:
        """Mean input embedding of ``word``'s tokens (initialisation of [V] from the class word)."""
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        return self.text_encoder.get_input_embeddings().weight[ids].detach().float().mean(0, keepdim=True)

    def _hook(self, module, inputs, output):
        if self._token is None:
            return output
        ids = inputs[0]
        out = output
        for i, tid in enumerate(self.ids):
            mask = (ids == tid).unsqueeze(-1)
            if bool(mask.any()):
                out = torch.where(mask, self._token[i].to(out.dtype), out)
        return out

    def prompt(self, text: str) -> str:
        """Expand the placeholder to its n vectors ("sks" -> "sks sks_1 ...")."""
        if self.placeholder is None or len(self.ids) < 2:
            return text
        return text.replace(self.placeholder, " ".join(self.tokenizer.convert_ids_to_tokens(self.ids)))

    def __call__(self, prompts: Sequence[str], token: torch.Tensor | None) -> torch.Tensor:
        tok = self.tokenizer([self.prompt(p) for p in prompts], padding="max_length",
                             max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        self._token = token
        try:
            return self.text_encoder(tok.input_ids.to(device))[0]
        finally:
            self._token = None
