"""E4T nodes (SD1.x): the loader, Apply (word embedding per denoising step + weight offsets) and the few-step tuning.
Thin: the encoder head, the offset generators and the files are in models/e4t.py, the training loop in
training/e4t.py, the ComfyUI plumbing in nodes/comfy/ (the feature pass in unet, the offsets in weights, the slot in
text, the per-step wrapper in wrappers)."""
from __future__ import annotations

import logging
import os

import torch
from comfy.model_management import throw_exception_if_processing_interrupted
from comfy.utils import ProgressBar

from ..models import e4t as core
from ..models.checkpoints import atomic_save_safetensors, check_replaceable, file_stem
from ..models.inputs import check_image, check_number
from ..training import e4t as tuning
from ..training import run
from ..training.lora import ATTENTION_TARGETS
from ..training.trainer import losses_table
from .comfy import denoiser as comfy_denoiser
from .comfy import folders, text, unet, vision, weights, wrappers
from .train import loss_curve_image, report_stop

log = logging.getLogger("personalize")
check_stop = throw_exception_if_processing_interrupted

CATEGORY = "personalize/e4t"
E4T = "PERSONALIZE_E4T"
FOLDER = "e4t"
MODES = {"per step (reference)": "per_step", "static (approximation)": "static"}
TUNE_MODES = {"reference (all UNet weights + offsets + encoder)": "tune",
              "light (offsets + LoRA + encoder; not the reference)": "tune-light"}
# The latent the static mode takes its UNet features from: unit noise at the last training timestep, the state of
# the first step of a full denoise (our choice for "computed once"; the reference recomputes at every step).
STATIC_LATENT_SIDE, STATIC_SEED = 64, 0
LIGHT_LORA_RANK = 16  # our default for the light mode (not a reference value)
RESOLUTION = 512  # the reference's crop size (tuning_e4t.py --resolution)
MIN_IMAGE_SIDE = 64
# Bytes autograd keeps for the backward of one tuning step (the full UNet pass and the down + mid feature pass), per
# latent pixel of the batch, SD1.x in fp32 with every weight trainable: measured with torch's saved-tensor hooks on a
# full-size SD1.5 UNet (random weights) at a 16x16 latent, where attention's score matrices are no part of it (ComfyUI
# runs PyTorch's scaled-dot-product attention, which on a GPU keeps none); bench/e4t_step.py prints the figure again.
# At a 64x64 latent the CPU, whose attention keeps the scores, measured 1.63 MB. Gradient checkpointing keeps about
# a quarter (our estimate); bf16 / fp16 autocast halves it.
ACTIVATION_BYTES_PER_LATENT_PIXEL = 760_000
# Tensors of the size of each offset target's weight that a tuning step keeps for the backward besides the weight
# copies: the generator's M = a b^T and linear_column output (once per step), and in each of the two UNet passes
# 1 + dW and the product W * (1 + dW). Our count from models/e4t.py WeightOffsets.forward and the weight function.
DW_GRAPH_TENSORS = 2 + 2 * 2


class E4TModel:
    """What flows on the E4T socket: the loaded folder (config, head, offset generators), its CLIP tower as a ComfyUI
    CLIP_VISION model, the head under model management, and dW computed once (on first use)."""

    def __init__(self, name: str, weights_: core.E4TWeights, clip_vision, tuned_from: str | None = None):
        self.name, self.weights, self.clip_vision, self.tuned_from = name, weights_, clip_vision, tuned_from
        self.head_patcher = weights.adapter_patcher(weights_.head)
        self._deltas = None

    @property
    def config(self) -> core.E4TConfig:
        return self.weights.config

    @property
    def head(self) -> core.E4THead:
        return self.weights.head

    def deltas(self) -> dict[str, torch.Tensor]:
        """dW of every offset target (fp32, CPU), computed once on the compute device."""
        if self._deltas is None:
            offsets = self.weights.offsets
            device = weights.compute_device()
            with torch.no_grad():
                offsets.to(device)
                try:
                    self._deltas = {n: d.float().cpu() for n, d in offsets.deltas().items()}
                finally:
                    offsets.to("cpu")
        return self._deltas


def e4t_folders() -> list[str]:
    return folders.list_model_dirs(FOLDER, core.CONFIG_FILE)


def load_model(name: str) -> E4TModel:
    folder = folders.model_dir(FOLDER, name, core.CONFIG_FILE, "E4T model")
    w = core.load_e4t(folder, clip_folder=lambda n: folders.model_dir(FOLDER, n, core.CONFIG_FILE, "E4T model"))
    clip_vision = vision.load_open_clip_tower(w.clip_vision, f"{name}/encoder")
    patches = clip_vision.model.vision_model.embeddings.position_embedding.weight.shape[0] - 1
    hidden = clip_vision.model.vision_model.embeddings.class_embedding.shape[0]
    if (w.head.hidden, w.head.n_inputs) != (hidden, core.n_clip_inputs(patches)):
        raise ValueError(f"{name}: the head takes {w.head.n_inputs} vectors of {w.head.hidden}, the CLIP tower gives "
                         f"{core.n_clip_inputs(patches)} of {hidden}: the encoder file is damaged or mixed up")
    w.clip_vision = None  # loaded into ComfyUI's model; the raw tensors are not kept
    return E4TModel(name, w, clip_vision)


def check_model(model, clip, e4t: E4TModel) -> None:
    """Refuse models other than the SD1.x family the E4T encoder was made for."""
    head = e4t.head
    if not unet.is_sd1_like(model):
        raise ValueError(f"E4T works on SD1.x UNets; this model is {type(model.model).__name__} "
                         f"({type(model.model.diffusion_model).__name__})")
    _, _, context = unet.discover_sites(model)
    channels = sum(unet.feature_channels(model))
    if (context, channels) != (head.word_dim, head.feature_channels):
        raise ValueError(f"this model has context width {context} and UNet features of {channels} channels; the E4T "
                         f"encoder '{e4t.name}' takes {head.word_dim} and {head.feature_channels} (SD1.x: "
                         f"{core.SD1_WORD_DIM} and {core.SD1_FEATURE_CHANNELS}): use the SD1.x model it was made for")
    text.sd1_text_encoder(clip, head.word_dim)
    if wrappers.has_conditioner(model):
        raise ValueError("the model already went through an E4T Apply node: connect the model from before it")


def image_pixels(image: torch.Tensor) -> torch.Tensor:
    """The first image of an IMAGE batch as ``(1, 3, H, W)`` in [-1, 1]."""
    image = check_image(image, "image", MIN_IMAGE_SIDE)
    if image.shape[0] > 1:
        log.warning("E4T takes one image; using the first of %d", image.shape[0])
    return image[:1, ..., :3].permute(0, 3, 1, 2).float() * 2 - 1


def clip_inputs_of(e4t: E4TModel, pixels: torch.Tensor) -> torch.Tensor:
    last, pooled = vision.tower_outputs(e4t.clip_vision, core.preprocess(pixels))
    return core.clip_inputs(last, pooled).cpu()


def _prepare_head(e4t: E4TModel) -> None:
    weights.prepare_adapter(e4t.head_patcher, torch.float32)  # the head stays fp32 (a small part of the step's cost)


class PersonalizeE4TLoader:
    DESCRIPTION = ("Loads an E4T model folder from models/e4t (mkshing/e4t-diffusion's config.json, encoder.pt, "
                   "weight_offsets.pt, or safetensors conversions; or a folder the tuning node or training/e4t_pretrain.py "
                   "wrote). The encoder's CLIP image tower loads through ComfyUI's CLIP-vision loader.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (E4T,)
    RETURN_NAMES = ("e4t",)
    OUTPUT_TOOLTIPS = ("The E4T encoder and weight offsets, for E4T Apply and E4T Tune.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"e4t_name": (e4t_folders(), {"tooltip": "A folder in models/e4t holding config.json and "
                                                                     "the weights (e.g. e4t-diffusion-ffhq-celebahq-v1)."})}}

    def load(self, e4t_name):
        return (load_model(e4t_name),)


def apply_e4t(model, clip, e4t: E4TModel, pixels: torch.Tensor, prompt: str, mode: str):
    """``(model, positive, negative, conditioner)``: the model with the offsets baked (unless they are in a tuned
    model already) and, per step, the wrapper; the positive (the prompt's static encoding, which the wrapper
    recognizes) and the negative (the empty prompt, as the reference)."""
    check_model(model, clip, e4t)
    cfg, head = e4t.config, e4t.head
    slot = text.SlotPrompt(clip, prompt, cfg.placeholder_token, head.word_dim)
    class_embed = text.word_embedding_of(clip, cfg.domain_class_token, head.word_dim)
    clip_in = clip_inputs_of(e4t, pixels)
    if e4t.weights.offsets is not None:
        patched = weights.bake_offsets(model, e4t.deltas())
    else:
        if not weights.has_weight_patches(model):
            raise ValueError(f"the E4T encoder '{e4t.name}' was tuned: its offsets and UNet weights are in the tuned model. "
                             "Connect the model output of E4T Tune, or load its LoRA "
                             f"({e4t.weights.config.raw.get(core.UNET_LORA, 'the tuned LoRA')}) with LoraLoaderModelOnly "
                             "at strength 1 before this node")
        patched = model.clone()
    empty, pooled_empty = text.plain_context(clip, "")
    _prepare_head(e4t)
    static = static_embedding(patched, e4t, clip_in, class_embed, empty)
    weights.load_companions([clip.patcher])
    with torch.no_grad():
        marker = slot.encode(static.to(weights.compute_device())).float().cpu()
    conditioner = None
    if mode == "per_step":
        conditioner = wrappers.E4TConditioner(e4t.head_patcher, slot, clip_in, class_embed, cfg.domain_embed_scale,
                                              empty, marker)
        wrappers.install_conditioner(patched, conditioner, [clip.patcher, e4t.head_patcher])
    positive = [[marker, {"pooled_output": pooled_empty}]]
    negative = [[empty, {"pooled_output": pooled_empty}]]
    return patched, positive, negative, conditioner


def static_embedding(model, e4t: E4TModel, clip_in, class_embed, empty) -> torch.Tensor:
    """``e`` from the features of seeded noise at the first step of a full denoise (the static mode, and the
    positive's encoding that the per-step wrapper recognizes and replaces)."""
    g = torch.Generator().manual_seed(STATIC_SEED)
    noise = torch.randn(1, model.model.latent_format.latent_channels, STATIC_LATENT_SIDE, STATIC_LATENT_SIDE, generator=g)
    return wrappers.first_step_embedding(model, e4t.head_patcher, noise, empty, clip_in, class_embed,
                                         e4t.config.domain_embed_scale)


class PersonalizeE4TApply:
    DESCRIPTION = ("E4T: personalizes an SD1.x model from one image of the E4T model's domain (the public weights: faces). "
                   "Bakes the learned weight offsets into the model (W * (1 + dW) on every attention q, k, v) and writes "
                   "the encoder's word embedding into the placeholder of the prompt (default *s: 'a photo of *s'). By "
                   "default the embedding is recomputed at every denoising step from the current latent, as the "
                   "reference does (an extra pass of the input and middle blocks on the positive: about 1.25x a "
                   "plain step by its parts); 'static' computes it once (an approximation). Use the "
                   "positive and negative outputs in the sampler (the negative is the empty prompt, as the reference). "
                   "For best identity, tune first (E4T Tune) and apply the tuned encoder to the tuned model.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("model", "positive", "negative")
    OUTPUT_TOOLTIPS = ("The model with the weight offsets (and, per step, the E4T wrapper).",
                       "The prompt with the subject's word embedding.", "The empty prompt (the reference's negative).")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x model the E4T weights were made for (the tuned model after E4T Tune)."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder."}),
                "e4t": (E4T, {"tooltip": "From E4T Loader, or the tuned encoder from E4T Tune."}),
                "image": ("IMAGE", {"tooltip": "One image of the subject (a face for the public weights; square crops "
                                               "work best: others are centre-cropped)."}),
                "prompt": ("STRING", {"multiline": True, "default": "a photo of *s",
                                      "tooltip": "Prompt naming the subject once with the E4T placeholder (the model's "
                                                 "placeholder_token, *s for the public weights)."}),
                "mode": (list(MODES), {"default": "per step (reference)",
                                       "tooltip": "per step: the embedding follows the current latent at every step (the "
                                                  "reference); static: computed once (faster, an approximation)."}),
            },
        }

    def apply(self, model, clip, e4t, image, prompt, mode="per step (reference)"):
        patched, positive, negative, _ = apply_e4t(model, clip, e4t, image_pixels(image), prompt, MODES[mode])
        return patched, positive, negative


def tune_crop(pixels: torch.Tensor, resolution: int, seed: int) -> torch.Tensor:
    """The reference's tuning image, made once (seeded): ``models.e4t.reference_crop`` of the 8-bit picture, as the
    reference reads it (short side to ``resolution`` by pixel-area averaging, a random square crop, a random flip)."""
    from PIL import Image

    u8 = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).contiguous().numpy()
    g = torch.Generator().manual_seed(int(seed))
    return core.reference_crop(Image.fromarray(u8), resolution, g)[None]


class PersonalizeE4TTune:
    DESCRIPTION = ("E4T test-time tuning (the paper's 5-15 steps) on one image: trains the encoder head, the weight "
                   "offsets and, in the reference mode, every UNet weight (as full-size deltas on a copy: the shared "
                   "model is never changed), with the reference's loss (noise MSE + L2 on the word embedding), learning "
                   "rate and batch of copies. The light mode trains offsets + LoRA + head instead (much less memory; not "
                   "the reference). Outputs the tuned model and encoder (connect both to E4T Apply), and saves the tuned "
                   "UNet as a LoRA (stock 'diff' keys: LoraLoaderModelOnly) in models/loras, the tuned encoder as "
                   "models/e4t/{save_name}/ and a resumable state in output/personalize_train.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", E4T, "STRING", "IMAGE")
    RETURN_NAMES = ("model", "e4t", "lora_name", "loss_curve")
    OUTPUT_TOOLTIPS = ("The tuned model (offsets and weights baked), for E4T Apply.",
                       "The tuned encoder, for E4T Apply with the tuned model.",
                       "The tuned UNet's file in models/loras (LoraLoaderModelOnly, strength 1).",
                       "Loss per term over the steps.")
    FUNCTION = "tune"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x model the E4T weights were made for."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder (frozen)."}),
                "vae": ("VAE", {"tooltip": "Its VAE, to encode the image."}),
                "e4t": (E4T, {"tooltip": "The pretrained E4T model (E4T Loader)."}),
                "image": ("IMAGE", {"tooltip": "One image of the subject."}),
                "steps": ("INT", {"default": core.TUNE_STEPS, "min": 1, "max": 1000,
                                  "tooltip": "Optimizer steps (the paper: 5-15; the reference script: 15)."}),
                "learning_rate": ("FLOAT", {"default": core.LEARNING_RATE, "min": 1e-8, "max": 1.0, "step": 1e-8,
                                            "tooltip": "AdamW learning rate (reference 1.6e-5)."}),
                "batch_size": ("INT", {"default": core.BATCH_SIZE, "min": 1, "max": 64,
                                       "tooltip": "Copies of the image per step (reference 16), each with its own noise "
                                                  "and timestep."}),
                "reg_lambda": ("FLOAT", {"default": core.TUNE_REG_LAMBDA, "min": 0.0, "max": 10.0, "step": 1e-5,
                                         "tooltip": "Weight of the L2 on the word embedding (reference script 1e-4; "
                                                    "its README uses 0.1)."}),
                "mode": (list(TUNE_MODES), {"default": "reference (all UNet weights + offsets + encoder)",
                                            "tooltip": "reference: as the reference script (about 20 GB before "
                                                       "activations for SD1.5); light: offsets + LoRA + head."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the crop, noise, "
                                                                                      "timesteps and prompts."}),
                "save_name": ("STRING", {"default": "e4t_tuned", "tooltip": "Name of the LoRA (models/loras), the "
                                                                           "encoder folder (models/e4t) and the state."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the run saved under save_name."}),
            },
            "optional": {
                "lora_rank": ("INT", {"default": LIGHT_LORA_RANK, "min": 1, "max": 256, "tooltip": "LoRA rank of the light mode."}),
                "resolution": ("INT", {"default": RESOLUTION, "min": MIN_IMAGE_SIDE, "max": 2048, "step": 8,
                                       "tooltip": "Side of the square crop (reference 512)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Less memory, ~30% slower."}),
                "mixed_precision": (["no", "bf16", "fp16"], {"default": "no", "tooltip": "Autocast dtype of the passes."}),
                "max_grad_norm": ("FLOAT", {"default": core.MAX_GRAD_NORM, "min": 0.0, "max": 100.0, "step": 0.1,
                                            "tooltip": "Gradient clipping (reference 1.0; 0: off)."}),
                "checkpoint_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Save every N steps (0: at the end)."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace files named save_name that this pack did "
                                                                       "not write."}),
            },
        }

    def tune(self, model, clip, vae, e4t, image, steps, learning_rate, batch_size, reg_lambda, mode, seed, save_name,
             resume, lora_rank=LIGHT_LORA_RANK, resolution=RESOLUTION, gradient_checkpointing=False,
             mixed_precision="no", max_grad_norm=core.MAX_GRAD_NORM, checkpoint_every=0, overwrite=False):
        check_model(model, clip, e4t)
        comfy_denoiser.check_trainable(model)
        if e4t.weights.offsets is None:
            raise ValueError(f"'{e4t.name}' is already tuned; tune from the pretrained E4T model (E4T Loader)")
        if weights.has_offset_patches(model):
            raise ValueError("the model carries E4T weight offsets already (E4T Apply or Tune): connect the model from "
                             "the checkpoint loader")
        learning_rate = check_number(learning_rate, "learning_rate", 1e-12, 1.0)
        name = file_stem(save_name, "save_name")
        train_mode = TUNE_MODES[mode]
        cfg = e4t.config
        config = tuning.E4TTrainConfig(steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                                       reg_lambda=check_number(reg_lambda, "reg_lambda", 0.0),
                                       domain_embed_scale=cfg.domain_embed_scale,
                                       max_grad_norm=check_number(max_grad_norm, "max_grad_norm", 0.0), seed=seed,
                                       templates=cfg.templates(), mixed_precision=mixed_precision, mode=train_mode)
        pixels = tune_crop(image_pixels(image), int(resolution), seed)
        lora_path = os.path.join(folders.first_folder("loras"), name + ".safetensors")
        out_folder = os.path.join(folders.first_folder(FOLDER), name)
        state_path = os.path.join(folders.train_folder(), name + ".e4t.state.safetensors")
        for path in (lora_path, state_path, os.path.join(out_folder, "encoder.safetensors")):
            check_replaceable(path, overwrite)
        if resume and not os.path.isfile(state_path):
            raise FileNotFoundError(f"resume is on but there is no saved state {state_path}; tune once with save_name "
                                    f"'{name}' first, or turn resume off")

        head_w = e4t.head
        with torch.inference_mode(False), torch.enable_grad():
            head = core.E4THead(head_w.feature_channels, head_w.hidden, head_w.n_inputs, head_w.word_dim)
            head.load_state_dict({k: v.clone() for k, v in head_w.state_dict().items()})
            offsets = core.OffsetSet(e4t.weights.offsets.shapes())
            offsets.load_state_dict({k: v.clone() for k, v in e4t.weights.offsets.state_dict().items()})
            full = lora = None
            if train_mode == "tune":
                full = tuning.FullDeltas(weights.unet_weight_shapes(model))
            else:
                lora = weights.training_lora(model, ATTENTION_TARGETS, lora_rank, None, seed)
            trainable = sum(p.numel() for m in (head, offsets, full, lora) if m is not None for p in m.parameters())
            device = weights.compute_device()
            self._check_memory(model, device, trainable, offsets, batch_size, resolution, gradient_checkpointing,
                               mixed_precision, train_mode)

            clip_in = clip_inputs_of(e4t, pixels)
            class_embed = text.word_embedding_of(clip, cfg.domain_class_token, head.word_dim)
            empty, _ = text.plain_context(clip, "")
            prompts = {t: text.SlotPrompt(clip, t, "{placeholder_token}", head.word_dim) for t in config.templates}
            latents = comfy_denoiser.vae_latents(model, vae, ((pixels + 1) / 2).permute(0, 2, 3, 1), check_stop)

            caches = weights.OffsetCaches(offsets)
            patched = weights.attach_e4t_training(model, caches, full=full, lora=lora)
            den = comfy_denoiser.ComfyDenoiser(patched)
            den.companions.append(clip.patcher)
            den.load()
            device = den.device
            for m in (head, offsets, full, lora):
                if m is not None:
                    m.to(device)
            dm = patched.model.diffusion_model
            empty_d = empty.to(device)

            dtype = unet.compute_dtype(model)

            def features(x_t, t):  # the DDPM x_t at integer t is the UNet's input (c_in * x_sigma) at that timestep
                caches.refresh()  # dW once per step, for both UNet passes
                ctx = empty_d.to(dtype).expand(x_t.shape[0], -1, -1)
                return core.pool_features(unet.down_mid_features(dm, x_t.to(dtype), t.float(), ctx))

            def encode(batch_prompts, e):
                out = torch.empty(e.shape[0], empty_d.shape[1], empty_d.shape[2], device=device)
                for p in dict.fromkeys(batch_prompts):
                    rows = [i for i, q in enumerate(batch_prompts) if q == p]
                    out = out.index_copy(0, torch.tensor(rows, device=device), prompts[p].encode(e[rows]).to(out))
                return out

            extra = {"unet": full} if full is not None else {"lora": lora}
            trainer = tuning.E4TTrainer(den, features, encode, head, offsets, latents, clip_in, class_embed, config,
                                        extra=extra, device=device)
            if resume:
                trainer.load(state_path)
            pbar = ProgressBar(steps)
            pbar.update_absolute(trainer.step, steps)
            model_ref = model

            def save_outputs(metadata):
                with torch.no_grad():
                    deltas = {n: d.detach().float().cpu() for n, d in offsets.deltas().items()}
                    diff = weights.e4t_diff_state(model_ref, deltas, full=full, lora=lora)
                atomic_save_safetensors(diff, lora_path, {**metadata, "personalize_method": "e4t"}, overwrite=overwrite)
                folders.refresh_file_list("loras")
                conf = {**cfg.raw, "learning_rate": config.learning_rate, "train_batch_size": config.batch_size,
                        "reg_lambda": config.reg_lambda, "max_train_steps": trainer.step, "pretrained_args": cfg.raw.get(
                            "pretrained_args") or {k: v for k, v in cfg.raw.items() if k != "pretrained_args"},
                        core.OFFSETS_IN_UNET: True, core.CLIP_FROM: e4t.tuned_from or e4t.name,
                        core.UNET_LORA: name + ".safetensors", "personalize_mode": train_mode}
                core.save_e4t(out_folder, conf, head, overwrite=overwrite)

            training = run.TrainingRun(trainer, state_path, save_outputs, {"e4t": e4t.name, "mode": train_mode},
                                       checkpoint_every=checkpoint_every,
                                       progress=lambda step, _: pbar.update_absolute(step, steps), check_stop=check_stop,
                                       overwrite=overwrite,
                                       on_stop=lambda step, err: report_stop(step, steps, err, [lora_path, out_folder, state_path]))
            try:
                with comfy_denoiser.gradient_checkpointing(den.patcher, gradient_checkpointing):
                    training.run()
            except torch.OutOfMemoryError as err:
                raise MemoryError(self._memory_message(train_mode, "ran out of memory during the first steps")) from err
            for m in (head, offsets, full, lora):
                if m is not None:
                    m.requires_grad_(False)
            with torch.no_grad():
                deltas = {n: d.detach().float().cpu() for n, d in offsets.deltas().items()}
                full_cpu = None
                if full is not None:
                    full_cpu = {k: v.detach().float().cpu() for k, v in full.items()}
                elif lora is not None:
                    full_cpu = {f"diffusion_model.{n}.weight": d.delta().detach().float().cpu() for n, d in lora.items()}
                tuned = weights.bake_offsets(model, deltas, full_cpu)
            head.cpu()
            curve = loss_curve_image(losses_table(trainer.history))
        tuned_w = core.E4TWeights(core.read_config(out_folder), head, None, None, out_folder)
        out = E4TModel(name, tuned_w, e4t.clip_vision, tuned_from=e4t.tuned_from or e4t.name)
        log.info("E4T tuned %s: %d steps, last losses %s", name, trainer.step, trainer.history[-1] if trainer.history else {})
        return tuned, out, name + ".safetensors", curve

    @staticmethod
    def _memory_message(mode: str, what: str) -> str:
        other = ("switch mode to light (offsets + LoRA + encoder; not the reference), turn on gradient_checkpointing, "
                 "or lower batch_size") if mode == "tune" else "turn on gradient_checkpointing or lower batch_size"
        return f"E4T tuning {what}: {other}"

    def _check_memory(self, model, device, trainable: int, offsets: core.OffsetSet, batch: int, resolution: int,
                      checkpointing: bool, mixed_precision: str, mode: str):
        """Stop before any work when the estimate (:func:`tuning_memory`) does not fit the compute device's free memory
        (the CPU is not checked: it swaps rather than fails)."""
        if torch.device(device).type == "cpu":
            return
        parts = tuning_memory(model, trainable, offsets, batch, resolution, checkpointing, mixed_precision)
        check_memory_fits(parts, weights.free_memory(device), mode, trainable)


def tuning_memory(model, trainable: int, offsets: core.OffsetSet, batch: int, resolution: int, checkpointing: bool,
                  mixed_precision: str = "no") -> dict[str, int]:
    """Estimated bytes of one tuning run on the compute device, by part: the trainable state (the parameters, their
    gradients and AdamW's two moments), the model's weights, the activations of both UNet passes, the per-forward
    weight copies that autograd keeps (ComfyUI hands a wrapped layer a copy of its weight; without gradient
    checkpointing every layer's copy lives until the backward, in both passes) and the offset generators' graph."""
    dm = model.model.diffusion_model

    def nbytes(modules):
        return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())

    model_bytes = nbytes([dm])
    feature_bytes = nbytes([dm.time_embed, dm.input_blocks, dm.middle_block])
    act = ACTIVATION_BYTES_PER_LATENT_PIXEL * batch * (resolution // 8) ** 2
    if mixed_precision != "no":
        act //= 2
    copies = model_bytes + feature_bytes
    if checkpointing:
        act, copies = act // 4, 0
    dw = sum(o * i for o, i in offsets.shapes().values())
    return {"trainable state": tuning.adamw_bytes(trainable), "model weights": model_bytes, "activations": act,
            "weight copies": copies, "offset graph": DW_GRAPH_TENSORS * 4 * dw}


def check_memory_fits(parts: dict[str, int], free: int, mode: str, trainable: int) -> None:
    need = sum(parts.values())
    if need > free:
        detail = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in parts.items())
        raise MemoryError(PersonalizeE4TTune._memory_message(
            mode, f"needs about {need / 2**30:.1f} GB ({detail} GB, estimated; {trainable / 1e6:.0f}M trainable "
                  f"parameters) and {free / 2**30:.1f} GB are free"))


NODES = {
    "PersonalizeE4TLoader": ("E4T Loader (Personalize)", PersonalizeE4TLoader),
    "PersonalizeE4TApply": ("E4T Apply (Personalize)", PersonalizeE4TApply),
    "PersonalizeE4TTune": ("E4T Tune (Personalize)", PersonalizeE4TTune),
}
