"""LoRA trainer node (DreamBooth-LoRA with SuDe and PALP terms). Thin: the loop, the losses and the run schedule are in
training/, the ComfyUI plumbing in nodes/comfy/."""
from __future__ import annotations

import logging
import os

import folder_paths
import numpy as np
import torch
from comfy.model_management import throw_exception_if_processing_interrupted
from comfy.utils import ProgressBar

from ..models.checkpoints import check_replaceable, file_stem
from ..models.inputs import check_image
from ..training import export, run
from ..training.lora import ATTENTION_TARGETS, EXTRA_TARGETS
from ..training.losses import PALP_ALPHA, PALP_BETA, SUDE_WEIGHT
from ..training.trainer import INSTANCE_PROMPT, TrainConfig, Trainer, losses_table
from .comfy import denoiser as comfy_denoiser
from .comfy import feedback, folders, text, weights

log = logging.getLogger("personalize")
check_stop = throw_exception_if_processing_interrupted  # ComfyUI's Cancel: raises once the user pressed it

CATEGORY = "personalize/training"
TARGET_CHOICES = {"attention (q, k, v, out)": ATTENTION_TARGETS,
                  "attention + feed-forward": ATTENTION_TARGETS + EXTRA_TARGETS[:2],
                  "cross-attention only": tuple(t for t in ATTENTION_TARGETS if t.startswith("attn2"))}
VALIDATION_STEPS = 20  # DDIM steps of a validation sample
VALIDATION_GUIDANCE = 7.5
# Learning rate of the [V] embedding: our choice, between the LoRA's 1e-4 and the few 1e-3 textual inversion uses alone
# (a token trained together with a LoRA needs to move less); not a paper value.
TOKEN_LEARNING_RATE = 5e-4
# Widget step of the learning rates. ComfyUI's frontend rounds a typed FLOAT to 10^-p with p from the step
# (ComfyUI_frontend useFloatWidget, onFloatValueChange); a 1e-7 step keeps 1e-6 (SuDe's reference rate), 2e-6, 1.5e-5.
LEARNING_RATE_STEP = {"step": 1e-7}
# Subject and class images: at least this many pixels a side, sides a multiple of the SD VAE's downsampling (8).
MIN_IMAGE_SIDE, IMAGE_MULTIPLE = 64, 8


def _weight(default: float, tip: str, high: float = 10.0):
    return ("FLOAT", {"default": default, "min": 0.0, "max": high, "step": 0.05, "tooltip": tip})


class PersonalizeLoRATrainer:
    DESCRIPTION = ("Trains a LoRA on the attention layers of an SD1.x/SD2.x/SDXL model from 1-4 subject images "
                   "(DreamBooth-LoRA), optionally with a new token embedding [V] (textual inversion), with the SuDe term "
                   "(the subject inherits its class's attributes) and the PALP term (stays aligned with target "
                   "prompts). Saves the LoRA to models/loras (loads with the stock LoRA loaders), the token to "
                   "models/embeddings (use it in prompts as embedding:{save_name}) and a resumable state to "
                   "output/personalize_train; Cancel leaves all of them usable.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "STRING", "IMAGE", "IMAGE", "CLIP", "STRING")
    RETURN_NAMES = ("model", "lora_name", "loss_curve", "validation", "clip", "subject")
    OUTPUT_TOOLTIPS = ("The input model with the trained LoRA applied (as LoraLoaderModelOnly would).",
                       "The LoRA file name in models/loras.",
                       "Loss per term over the steps.",
                       "Validation samples (validation prompt, fixed seed) every 'validate_every' steps and at the end.",
                       "The input CLIP, passed through: encode prompts with it so that they run after training (the "
                       "trained embedding file exists then).",
                       "How prompts name the subject: the subject token, or embedding:{save_name} when the token is "
                       "trained.")
    FUNCTION = "train"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "SD1.x / SD2.x / SDXL model to personalize."}),
                "clip": ("CLIP", {"tooltip": "Its text encoder (frozen; only the new token's embedding is trained)."}),
                "vae": ("VAE", {"tooltip": "Its VAE, to encode the subject images."}),
                "subject_token": ("STRING", {"default": "sks", "tooltip": "Rare word that names the subject in prompts "
                                                                        "(not used when train_token is on)."}),
                "class_word": ("STRING", {"default": "dog", "tooltip": "The subject's class, e.g. dog, person, cat."}),
                "palp_prompts": ("STRING", {"multiline": True, "default": "",
                                            "tooltip": "PALP target prompts, one per line, WITHOUT the subject token "
                                                       "(e.g. 'a sketch of a dog'). Empty: PALP off."}),
                "steps": ("INT", {"default": 500, "min": 1, "max": 100000, "tooltip": "Optimizer steps."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, **LEARNING_RATE_STEP,
                                            "tooltip": "AdamW learning rate of the LoRA."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 256, "tooltip": "LoRA rank (alpha = rank)."}),
                "sude_weight": _weight(SUDE_WEIGHT, "SuDe w_s (0 = off). 0.4 for DreamBooth (paper/reference)."),
                "palp_weight": _weight(1.0, "Weight of the PALP term (used when target prompts are given)."),
                "prior_weight": _weight(0.0, "DreamBooth prior preservation weight (0 = off); class images are "
                                             "'prior_images' or generated once by the base model and cached."),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of everything random."}),
                "save_name": ("STRING", {"default": "personalize_lora", "tooltip": "File name (no extension) in "
                                                                                  "models/loras."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue the run saved under save_name "
                                                                   "(output/personalize_train/{save_name}.state.safetensors)."}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": "Subject images (1-4 are typical)."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Or a folder of subject images inside ComfyUI's "
                                               "input folder, e.g. 'my_dog' (one size, at most 100 images)."}),
                "prior_images": ("IMAGE", {"tooltip": "Class images for prior preservation."}),
                "prior_count": ("INT", {"default": 8, "min": 1, "max": 200, "tooltip": "Class images to generate "
                                                                                      "when none are given."}),
                "targets": (list(TARGET_CHOICES), {"default": "attention (q, k, v, out)",
                                                   "tooltip": "Which layers get a LoRA."}),
                "palp_alpha": _weight(PALP_ALPHA, "PALP guidance of the frozen model on the target prompt "
                                                  "(paper: 15; 7.5 for compositions).", 50.0),
                "palp_beta": _weight(PALP_BETA, "PALP guidance of the personalized model (paper: 7.5; 1 for "
                                                "compositions).", 50.0),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Subject images per micro-batch."}),
                "grad_accumulation": ("INT", {"default": 1, "min": 1, "max": 256,
                                              "tooltip": "Micro-batches per optimizer step (effective batch = "
                                                         "batch_size x grad_accumulation)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Less memory, ~30% slower."}),
                "mixed_precision": (["no", "bf16", "fp16"], {"default": "no", "tooltip": "Autocast dtype of the forward passes."}),
                "validation_prompt": ("STRING", {"default": INSTANCE_PROMPT, "tooltip": "{token} and {class_word} are filled in."}),
                "validate_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "0: only at the end."}),
                "validation_steps": ("INT", {"default": VALIDATION_STEPS, "min": 0, "max": 200,
                                             "tooltip": "DDIM steps of a validation sample; 0: no validation."}),
                "checkpoint_every": ("INT", {"default": 100, "min": 0, "max": 100000, "tooltip": "Save the LoRA and "
                                                                                                "state every N steps."}),
                "train_token": ("BOOLEAN", {"default": False, "tooltip": "Also train a new token embedding [V] "
                                            "(textual inversion; PALP trains LoRA + token), started from the class "
                                            "word's embedding and saved as models/embeddings/{save_name}.safetensors. "
                                            "Prompts then name the subject as embedding:{save_name} (output 'subject')."}),
                "token_learning_rate": ("FLOAT", {"default": TOKEN_LEARNING_RATE, "min": 1e-7, "max": 1.0,
                                                  **LEARNING_RATE_STEP, "tooltip": "AdamW learning rate of the token."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Replace files named save_name in models/loras "
                              "and models/embeddings that this pack did not write (off: such a file stops the run "
                              "before training, and is kept)."}),
            },
        }

    def train(self, model, clip, vae, subject_token, class_word, palp_prompts, steps, learning_rate, rank, sude_weight,
              palp_weight, prior_weight, seed, save_name, resume, images=None, image_folder="", prior_images=None,
              prior_count=8, targets="attention (q, k, v, out)", palp_alpha=PALP_ALPHA, palp_beta=PALP_BETA,
              batch_size=1, grad_accumulation=1, gradient_checkpointing=False, mixed_precision="no",
              validation_prompt=INSTANCE_PROMPT, validate_every=0, validation_steps=VALIDATION_STEPS, checkpoint_every=100,
              train_token=False, token_learning_rate=TOKEN_LEARNING_RATE, overwrite=False):
        comfy_denoiser.check_trainable(model)
        name = file_stem(save_name, "save_name")
        prompts = tuple(p.strip() for p in palp_prompts.splitlines() if p.strip())
        if any(w in p.split() for p in prompts for w in (subject_token, f"embedding:{name}")):
            raise ValueError(f"PALP target prompts must be clean (no '{subject_token}', no 'embedding:{name}'): they "
                             "describe what the frozen model should draw, e.g. 'a sketch of a dog'")
        subject = f"embedding:{name}" if train_token else subject_token
        config = TrainConfig(steps=steps, learning_rate=learning_rate, rank=rank, seed=seed, token=subject,
                             train_token=train_token, token_learning_rate=token_learning_rate,
                             class_word=class_word, targets=TARGET_CHOICES[targets], sude_weight=sude_weight,
                             palp_weight=palp_weight if prompts else 0.0, palp_prompts=prompts, prior_weight=prior_weight,
                             palp_alpha=palp_alpha, palp_beta=palp_beta, batch_size=batch_size,
                             grad_accumulation=grad_accumulation, mixed_precision=mixed_precision,
                             gradient_checkpointing=gradient_checkpointing)
        pixels = _subject_images(images, image_folder)
        if prior_images is not None and config.prior_weight:
            check_image(prior_images, "prior_images", MIN_IMAGE_SIDE, IMAGE_MULTIPLE)
        lora_path = os.path.join(folders.first_folder("loras"), name + ".safetensors")
        state_path = os.path.join(folders.train_folder(), name + ".state.safetensors")
        embedding_path = os.path.join(folders.first_folder("embeddings"), name + ".safetensors")
        for path in (lora_path, state_path) + ((embedding_path,) if train_token else ()):  # before any work
            check_replaceable(path, overwrite)

        with torch.inference_mode(False), torch.enable_grad():
            lora = weights.training_lora(model, config.targets, config.rank, config.alpha, config.seed)
            denoiser = comfy_denoiser.ComfyDenoiser(weights.attach_training_lora(model, lora))
            denoiser.load()
            device = denoiser.device
            lora.to(device)
            latents = comfy_denoiser.vae_latents(model, vae, pixels, check_stop).to(device)
            encoder = text.ComfyTextEncoder(clip, adm=comfy_denoiser.sdxl_size_conditioning(model, latents))
            if train_token:
                denoiser.companions.append(clip.patcher)  # the text encoder runs (with grad) at every step
            denoiser.load()  # the VAE may have pushed the UNet out
            encode = denoiser.text_encoder(encoder)

            prior = None
            if config.prior_weight:
                if prior_images is not None:
                    prior = comfy_denoiser.vae_latents(model, vae, prior_images, check_stop).to(device)
                else:
                    prior = run.class_latents(denoiser, lora, encode, config.fill(config.class_prompt), prior_count,
                                              latents.shape[1:], config.seed, device, folders.train_folder(),
                                              weights.model_fingerprint(model), check_stop)
            token_init = encoder.word_embedding(class_word) if train_token else None
            trainer = Trainer(denoiser, lora, encode, latents, config, prior_latents=prior, token_init=token_init,
                              device=device)
            if resume:
                if not os.path.isfile(state_path):
                    raise FileNotFoundError(f"resume is on but there is no saved state {state_path}; train once with "
                                            f"save_name '{name}' first, or turn resume off")
                trainer.load(state_path)
            meta = {"token": subject, "class_word": class_word}
            if trainer.token is not None:  # the tokenizer finds [V] in this file; it holds the current vectors
                encoder.write_embedding(trainer.token, embedding_path, {**meta, "steps": str(trainer.step)}, overwrite)

            def save_outputs(metadata):
                export.save_lora(lora, lora_path, metadata=metadata, overwrite=overwrite)
                folders.refresh_file_list("loras")
                if trainer.token is not None:
                    encoder.write_embedding(trainer.token, embedding_path, metadata, overwrite)
                    folders.refresh_file_list("embeddings")

            pbar = ProgressBar(steps)
            pbar.update_absolute(trainer.step, steps)

            shown = []  # the decoded validation samples (the node's validation output)

            def show_sample(latent):  # the validation sample on the node as soon as it is made
                shown.append(comfy_denoiser.vae_images(model, vae, latent))
                pbar.update_absolute(trainer.step, steps, feedback.preview(shown[-1]))

            validation = run.Validation(trainer, config.fill(validation_prompt), validation_steps, VALIDATION_GUIDANCE, seed,
                                        check_stop, progress=lambda i, n: pbar.update_absolute(i, n), on_sample=show_sample)
            saved = [lora_path] + ([embedding_path] if trainer.token is not None else []) + [state_path]
            training = run.TrainingRun(trainer, state_path, save_outputs, meta, checkpoint_every=checkpoint_every,
                                       validate=validation, validate_every=validate_every,
                                       progress=lambda step, _: pbar.update_absolute(step, steps),
                                       check_stop=check_stop, overwrite=overwrite,
                                       on_stop=lambda step, err: report_stop(step, steps, err, saved))
            with comfy_denoiser.gradient_checkpointing(denoiser.patcher, gradient_checkpointing):
                training.run()
            validation()
            lora.requires_grad_(False)
            lora_state = export.lora_to_comfy(lora)
            curve = loss_curve_image(losses_table(trainer.history))
            decoded = torch.cat(shown) if shown else torch.zeros(1, *pixels.shape[1:3], 3)
        log.info("trained %s: %d steps, last losses %s", lora_path, trainer.step, trainer.history[-1] if trainer.history else {})
        return (weights.model_with_lora(model, lora_state), name + ".safetensors", curve, decoded, clip, subject)


def report_stop(step: int, steps: int, err: BaseException, saved: list[str]) -> None:
    """After Cancel or an error: say (log and node) which files hold the run as far as it got."""
    why = "cancelled" if feedback.is_cancel(err) else f"stopped by an error ({err})"
    names = ", ".join(saved)
    log.warning("training %s at step %d of %d; saved %s (resume: turn resume on with the same save_name)", why, step,
                steps, names)
    feedback.node_text(f"{why} at step {step}/{steps}: saved {names}; resume with the same save_name")


def _subject_images(images, folder: str) -> torch.Tensor:
    """The subject images: the IMAGE input, or the images of a folder inside ComfyUI's input folder (capped)."""
    if images is None and folder:
        files = run.image_files(run.confined_folder(folder, folder_paths.get_input_directory()))
        run.check_image_files(files)
        images = run.load_images(files).float() / 255.0
    if images is None:
        raise ValueError("no subject images: connect 'images' or set 'image_folder'")
    return check_image(images, "the subject images", MIN_IMAGE_SIDE, IMAGE_MULTIPLE)


def loss_curve_image(curves: dict[str, list[float]], width: int = 512, row: int = 96) -> torch.Tensor:
    """One panel per loss term (own y range, labelled with its last value), as an IMAGE ``(1, H, W, 3)``."""
    from PIL import Image, ImageDraw

    known = ("total", "reconstruction", "prior", "sude", "palp")
    names = [k for k in known if k in curves] + [k for k in curves if k not in known] or ["(no steps)"]
    img = Image.new("RGB", (width, row * len(names)), "white")
    draw = ImageDraw.Draw(img)
    colors = {"total": (0, 0, 0), "reconstruction": (31, 119, 180), "prior": (44, 160, 44), "sude": (214, 39, 40),
              "palp": (148, 103, 189)}
    for i, name in enumerate(names):
        vals = curves.get(name, [])
        top = i * row
        draw.rectangle([0, top, width - 1, top + row - 1], outline=(200, 200, 200))
        if vals:
            lo, hi = min(vals), max(vals)
            span = (hi - lo) or 1.0
            pts = [(8 + (width - 16) * j / max(len(vals) - 1, 1), top + row - 8 - (row - 28) * (v - lo) / span)
                   for j, v in enumerate(vals)]
            if len(pts) > 1:
                draw.line(pts, fill=colors.get(name, (0, 0, 0)), width=2)
            else:
                draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colors.get(name))
            label = f"{name}: {vals[-1]:.4g} (min {lo:.3g}, max {hi:.3g})"
        else:
            label = name
        draw.text((6, top + 4), label, fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


NODES = {
    "PersonalizeLoRATrainer": ("LoRA Trainer SuDe / PALP (Personalize)", PersonalizeLoRATrainer),
}
