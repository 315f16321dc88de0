"""The training denoiser over a ComfyUI model: DDPM-time calls to ``apply_model``, the VAE, SDXL's size
conditioning and gradient checkpointing. Everything here runs inside ``torch.inference_mode(False)``; tensors ComfyUI
made under inference mode are cloned before autograd sees them, and the trainable deltas reach the UNet through
``ModelPatcher.add_weight_wrapper`` (:mod:`.weights`)."""
from __future__ import annotations

import contextlib

import comfy.model_base
import comfy.model_management as mm
import torch

from ...training import conditioning
from ...training.schedule import NoiseSchedule
from .unet import is_unet


def check_trainable(model) -> None:
    """Raise unless the model is a UNet conditioned by cross-attention (SD1.x / SD2.x) or by cross-attention plus
    SDXL's pooled-text and size vector."""
    if not is_unet(model):
        raise ValueError(f"the LoRA trainer needs a UNet model (SD1.x / SD2.x / SDXL); got {type(model.model.diffusion_model).__name__}")
    if getattr(model.model, "adm_channels", 0) and not isinstance(model.model, comfy.model_base.SDXL):
        raise ValueError(f"the LoRA trainer supports SD1.x / SD2.x / SDXL base models; this one "
                         f"({type(model.model).__name__}) takes another extra conditioning (refiner, unCLIP, ...)")
    to = model.model_options.get("transformer_options", {})
    patched = sorted({kind for group in ("patches", "patches_replace") for kind, v in to.get(group, {}).items() if v})
    if patched:  # training calls carry no sigma and no cond/uncond layout: such patches would not act as in sampling
        raise ValueError(f"the model carries attention patches of other nodes ({', '.join(patched)}: an IP-Adapter, "
                         "PuLID, ...), which do not act during training; connect the model before those nodes and "
                         "apply them to the trainer's output model")


class ComfyDenoiser:
    """``denoiser(x_t, t, conditioning)`` over a ComfyUI model: DDPM ``x_t`` at integer ``t`` -> ``apply_model`` at
    ``sigma_t`` on ``x_t / sqrt(abar_t)``; the output is ComfyUI's denoised x0 (whatever the model's own
    parameterization), so the schedule says ``x0``. The schedule is the model's own ``model_sampling.sigmas``.
    The conditioning is the cross-attention context, or ``(context, y)`` for SDXL (see :class:`ComfyTextEncoder`).
    ``companions``: other patchers to keep loaded with the UNet (the text encoder when a token is trained)."""

    def __init__(self, patcher):
        self.patcher = patcher
        ms = patcher.get_model_object("model_sampling")
        sigmas = ms.sigmas.detach().float().cpu().clone()
        self.schedule = NoiseSchedule.from_sigmas(sigmas, "x0")
        self._sigmas = sigmas
        self.transformer_options = dict(patcher.model_options.get("transformer_options", {}))
        self.companions = []

    def __call__(self, x_t, t, context):
        sigma = self._sigmas[t.detach().cpu().long()].to(x_t.device)
        x = x_t * (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()  # x_sigma = x_t / sqrt(abar)
        extra = {}
        if isinstance(context, tuple):
            context, extra["y"] = context
        return self.patcher.model.apply_model(x, sigma, c_crossattn=context, transformer_options=self.transformer_options,
                                              **extra)

    def load(self) -> None:
        """Load the model (and install the weight wrappers) and its companions on the compute device, fully, first
        unloading everything else (training needs the memory for activations)."""
        mm.load_models_gpu([self.patcher, *self.companions], memory_required=1e20, force_full_load=True)

    @property
    def device(self):
        return self.patcher.load_device

    def text_encoder(self, encoder):
        """``encode(prompts, token)`` over ``encoder`` (:class:`~.text.ComfyTextEncoder`) for the trainer: prompts
        without the token are encoded once and cached; after ComfyUI loaded the text encoder for a new prompt, this
        denoiser is loaded again (loading the text encoder may have unloaded the UNet and its LoRA wrappers)."""
        contexts = {}

        def encode(prompts, token):
            if token is not None:
                return encoder(prompts, token)
            missing = [p for p in dict.fromkeys(prompts) if p not in contexts]
            for p in missing:
                contexts[p] = encoder([p], None)
            if missing:
                self.load()
            return conditioning.cat([contexts[p] for p in prompts])
        return encode


@contextlib.contextmanager
def gradient_checkpointing(patcher, enabled: bool = True):
    """Recompute each residual and transformer layer of the UNet in the backward pass (``torch.utils.checkpoint``,
    non-reentrant). The layers, not the blocks: ComfyUI's UNet runs a block's layers one by one
    (``forward_timestep_embed``), never calling the block's own forward."""
    layers = []
    if enabled:
        dm = patcher.model.diffusion_model
        for block in list(dm.input_blocks) + [dm.middle_block] + list(dm.output_blocks):
            layers += [layer for layer in block if any(p.numel() for p in layer.parameters())]
    for m in layers:
        forward = m.forward
        m.forward = (lambda f: lambda *a, **k: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False, **k))(forward)
    try:
        yield
    finally:
        for m in layers:
            m.__dict__.pop("forward", None)


def sdxl_size_conditioning(model, latents: torch.Tensor):
    """``pooled -> y`` for SDXL-type models (original size = target size = the training images' size, no crop, as
    ComfyUI's CLIPTextEncodeSDXL defaults); None for models without such a vector."""
    if not getattr(model.model, "adm_channels", 0):
        return None
    h, w = latents.shape[-2] * 8, latents.shape[-1] * 8  # SD VAEs downsample by 8

    def adm(pooled):
        return model.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0, target_width=w,
                                      target_height=h)
    return adm


def vae_latents(model, vae, images: torch.Tensor, check_stop=None) -> torch.Tensor:
    """IMAGE ``(N, H, W, C)`` -> the model's latent space (``process_latent_in`` of the VAE's latents);
    ``check_stop()`` before each image (it raises to stop)."""
    out = []
    with torch.no_grad():  # one image at a time: ComfyUI sizes VAE batches by free memory, so the batching (and with
        # it the last bits of a convolution's result) could change from run to run; Adam's first steps amplify that
        for i in range(images.shape[0]):
            if check_stop is not None:
                check_stop()
            out.append(vae.encode(images[i:i + 1, ..., :3].clone()).float())
    return model.model.process_latent_in(torch.cat(out).detach().clone())


def vae_images(model, vae, latents: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(model.model.process_latent_out(latents.detach().float())).float().clone()
