"""Per-step conditioning inside ComfyUI's sampler, as a stackable diffusion-model wrapper: E4T's word embedding,
recomputed at every denoising step from the current noisy latent (mkshing e4t/pipeline_stable_diffusion_e4t.py)."""
from __future__ import annotations

import torch

from ...models import e4t as core
from .unet import add_model_wrapper, down_mid_features

WRAPPER_KEY = "personalize_e4t"


def _tile(ctx: torch.Tensor, length: int) -> torch.Tensor:
    """A 77-token context repeated to ``length`` tokens, as ComfyUI batches contexts of different lengths
    (comfy/conds.py ``CONDCrossAttn.concat``)."""
    if length % ctx.shape[1]:
        raise ValueError(f"cannot fit a {ctx.shape[1]}-token E4T context into {length} tokens")
    return ctx.repeat(1, length // ctx.shape[1], 1)


class E4TConditioner:
    """The wrapper: finds the rows of the batch that carry this E4T prompt (their context equals :attr:`marker`, the
    prompt's static encoding that the Apply node outputs as the positive), and replaces their context with the prompt
    encoded with ``e = E(class) + scale * head(clip_inputs, features(x_row, t_row))``: the features from a pass of the
    input and middle blocks on the same rows with the empty prompt. Other rows (the negative, other prompts) pass as
    they are; the wrapped forward then runs with every other wrapper and patch."""

    def __init__(self, head_patcher, slot_prompt, clip_inputs: torch.Tensor, class_embed: torch.Tensor, scale: float,
                 empty: torch.Tensor, marker: torch.Tensor):
        self.head_patcher, self.prompt = head_patcher, slot_prompt
        self.clip_inputs, self.class_embed, self.scale = clip_inputs, class_embed, float(scale)
        self.empty, self.marker = empty, marker
        self.tolerance = 1e-3 * float(marker.abs().max()) + 1e-6  # relative to the marker's largest value
        self.calls = 0  # how many calls re-encoded rows (tests, logging)

    def rows(self, context: torch.Tensor, cond_or_uncond=None) -> list[int]:
        """Rows of the positive chunks (``cond_or_uncond`` 0: ComfyUI's batch layout, comfy/samplers.py) whose context
        is this prompt's."""
        m = self.marker.to(context.device, context.dtype)
        if context.shape[1] < m.shape[1]:
            return []
        candidates = list(range(context.shape[0]))
        if cond_or_uncond:
            per = context.shape[0] // len(cond_or_uncond)
            candidates = [i for i in candidates if cond_or_uncond[min(i // per, len(cond_or_uncond) - 1)] == 0]
        if not candidates:
            return []
        idx = torch.tensor(candidates, device=context.device)
        diff = (context[idx, : m.shape[1]] - m).abs().amax(dim=(1, 2)).tolist()  # one transfer per call
        return [i for i, d in zip(candidates, diff, strict=True) if d <= self.tolerance]

    @torch.no_grad()
    def encode_rows(self, diffusion_model, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        e = word_embedding(diffusion_model, self.head_patcher.model, x, timesteps, self.empty, self.clip_inputs,
                           self.class_embed, self.scale)
        return self.prompt.encode(e.float())

    def __call__(self, executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        rows = self.rows(context, transformer_options.get("cond_or_uncond")) if context is not None else []
        if rows:
            idx = torch.tensor(rows, device=x.device)
            ctx = self.encode_rows(executor.class_obj, x[idx], timesteps[idx])
            context = context.clone()
            context[idx] = _tile(ctx, context.shape[1]).to(context)
            self.calls += 1
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)


@torch.no_grad()
def word_embedding(diffusion_model, head, x, timesteps, empty, clip_inputs, class_embed, scale) -> torch.Tensor:
    """``e = E(class) + scale * head(clip_inputs, pooled down+mid features of x at timesteps with the empty prompt)``,
    one row per row of ``x`` (the UNet's input, ``c_in * x_sigma``)."""
    p = next(head.parameters())
    ctx = empty.to(x.device, x.dtype).expand(x.shape[0], -1, -1)
    feats = core.pool_features(down_mid_features(diffusion_model, x, timesteps, ctx)).to(p)
    enc = head(clip_inputs.to(p).expand(x.shape[0], -1, -1), feats)
    return core.domain_embedding(class_embed.to(p), enc, scale)


def first_step_embedding(model, head_patcher, noise, empty, clip_inputs, class_embed, scale) -> torch.Tensor:
    """:func:`word_embedding` at the first step of a full denoise from ``noise`` (``x_sigma = sigma_max * noise``)."""
    import comfy.model_management as mm

    from .unet import compute_dtype

    mm.load_models_gpu([model, head_patcher])
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigma_max.reshape(1).float()
    x = (noise * sigma / (sigma ** 2 + 1).sqrt()).to(model.load_device, compute_dtype(model))
    t = ms.timestep(sigma).to(model.load_device).float()
    return word_embedding(model.model.diffusion_model, head_patcher.model, x, t, empty, clip_inputs, class_embed,
                          scale).float().cpu()


def install_conditioner(model, conditioner: E4TConditioner, companions) -> None:
    """Put the wrapper on ``model`` (a clone the caller owns) and load ``companions`` (the text encoder, the head) with
    the UNet at sampling time, so that nothing is loaded mid-sampling."""
    add_model_wrapper(model, WRAPPER_KEY, conditioner)
    model.set_additional_models(WRAPPER_KEY, list(companions))


def has_conditioner(model) -> bool:
    import comfy.patcher_extension as pe

    return bool(model.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY))
