"""Train a SuDe / PALP LoRA on a diffusers model folder from a config file (JSON, or YAML when PyYAML is installed).

    python training/cli.py --config run.json            # one device
    accelerate launch training/cli.py --config run.json # several GPUs (accelerate is optional)
    accelerate launch --multi_gpu --num_processes 2 training/cli.py --config run.json  # 2 processes (GPUs or CPUs)

(On a machine without GPUs the processes run on the CPU, gloo; ``accelerate launch --cpu`` starts only one.
Each process draws its own batches, seed + rank; gradients are averaged over the processes.)

The config holds the run's paths and a ``train`` section with :class:`~.trainer.TrainConfig`'s fields::

    {"model": "path/to/stable-diffusion-v1-5",          # diffusers layout: unet, vae, text_encoder, tokenizer, scheduler
     "images": "path/to/subject_images",                # a folder or a list of files
     "output_dir": "out", "name": "my_subject", "resolution": 512,
     "checkpoint_every": 100, "resume": null,            # a *.state.safetensors to continue from
     "prior_images": null, "prior_count": 50,           # class images: a folder, else generated once and cached
     "train": {"steps": 500, "token": "sks", "class_word": "dog", "sude_weight": 0.4,
               "palp_weight": 1.0, "palp_prompts": ["a sketch of a dog"]}}

Outputs in ``output_dir``: ``<name>.safetensors`` (LoRA, ComfyUI's LoraLoader key format), ``<name>.state.safetensors``
(resumable: LoRA, token, optimizer, step, RNG), ``<name>.embedding.safetensors`` when the token is trained
(``models/embeddings``, use as ``embedding:<name>.embedding``), ``<name>.losses.json``. With several processes each
saves its own state, ``<name>.rank<r>.state.safetensors``, and the losses are process 0's; resume them with as many
processes and ``"resume": "<name>.state.safetensors"``.
The losses and checkpoint format are the ComfyUI node's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys

if __package__ in (None, ""):  # run as a script: import the pack under an alias (its folder name has a hyphen)
    import types

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _pkg = types.ModuleType("comfyui_personalize")
    _pkg.__path__ = [_root]
    sys.modules.setdefault("comfyui_personalize", _pkg)
    __package__ = "comfyui_personalize.training"  # noqa: A001

import torch  # noqa: E402

from ..models.checkpoints import atomic_write_json  # noqa: E402
from . import export  # noqa: E402
from .diffusers_host import ClipTextEncoder, DiffusersDenoiser, ldm_mapper, unet_lora  # noqa: E402
from .run import TrainingRun, class_latents, fingerprint, image_files, load_images  # noqa: E402
from .trainer import TrainConfig, Trainer, losses_table  # noqa: E402

log = logging.getLogger("personalize")

# DreamBooth class images in the SuDe reference: 50 (modelscope/facechain more_apps/Facechain-SuDe README).
PRIOR_COUNT = 50
RUN_DEFAULTS = {"resolution": 512, "checkpoint_every": 100, "resume": None, "prior_images": None,
                "prior_count": PRIOR_COUNT, "name": "personalize_lora", "output_dir": "."}


def read_config(path: str):
    """A run's settings from a JSON or YAML file; a file that cannot be read stops with the reason."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as err:
        raise SystemExit(f"cannot read the config {path}: {err}") from None
    if path.lower().endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"{path} is YAML but PyYAML is not installed: pip install pyyaml, or use JSON") from None
        return yaml.safe_load(text)
    try:
        return json.loads(text)
    except ValueError as err:
        raise SystemExit(f"{path} is not valid JSON: {err}") from None


def load_config(path: str) -> dict:
    cfg = read_config(path)
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a mapping of settings, got {type(cfg).__name__}")
    for key in ("model", "images"):
        if key not in cfg:
            raise SystemExit(f"{path}: '{key}' is required (see python training/cli.py --help)")
    unknown = sorted(set(cfg) - set(RUN_DEFAULTS) - {"model", "images", "train"})
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {unknown}; known: model, images, train, {', '.join(RUN_DEFAULTS)}")
    return {**RUN_DEFAULTS, **cfg}


def load_pixels(spec, size: int) -> torch.Tensor:
    """The images of a folder or a list -> (N, 3, size, size) in [-1, 1], resized on the short side and
    centre-cropped."""
    try:
        files = image_files(spec)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    return load_images(files, size).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """VAE latents (the distribution's mean, deterministic) times the VAE's scaling factor."""
    p = next(vae.parameters())
    chunks = [vae.encode(pixels[i:i + batch].to(p)).latent_dist.mean for i in range(0, pixels.shape[0], batch)]
    return torch.cat(chunks).float() * vae.config.scaling_factor


def _accelerator():
    try:
        from accelerate import Accelerator
    except ImportError:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun / accelerate launch --multi_gpu
    # accelerate runs several processes on CPUs (gloo) only when told to (ACCELERATE_USE_CPU=1); without a device it
    # would leave each process on its own as rank 0, all writing the same files
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    acc = Accelerator(cpu=world > 1 and not has_device)
    if world > 1 and acc.num_processes != world:
        raise SystemExit(f"launched as {world} processes but accelerate set up {acc.num_processes} "
                         f"({acc.distributed_type}); set ACCELERATE_USE_CPU=1 to run them on CPUs")
    if acc.num_processes > 1:
        log.info("process %d of %d (%s, %s)", acc.process_index, acc.num_processes, acc.distributed_type, acc.device)
    return acc


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True, help="JSON or YAML run config")
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run = load_config(args.config)
    train = dict(run.get("train") or {})
    if args.steps is not None:
        train["steps"] = args.steps
    config = TrainConfig.from_dict(train)

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    acc = _accelerator()
    device = acc.device if acc is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    main_process = rank == 0
    model = run["model"]
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device).requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").to(device)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")

    denoiser = DiffusersDenoiser.from_scheduler(unet, scheduler)
    if config.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    text = ClipTextEncoder(tokenizer, text_encoder, config.token if config.train_token else None)
    token_init = text.word_embedding(config.class_word) if config.train_token else None
    lora = unet_lora(unet, config.targets, config.rank, config.alpha, config.seed).to(device)
    latents = encode_latents(vae, load_pixels(run["images"], run["resolution"]))

    prior = None
    if config.prior_weight:  # with several processes, rank 0 generates the class images and the others read its cache
        with acc.main_process_first() if world > 1 else contextlib.nullcontext():
            prior = prior_latents(run, config, denoiser, text, vae, lora, latents.shape[1:], device)

    # each process draws its own batches (seed + rank); gradients are averaged before the (identical) updates
    proc_config = TrainConfig.from_dict({**config.to_dict(), "seed": config.seed + rank}) if world > 1 else config
    trainer = Trainer(denoiser, lora, text, latents, proc_config, prior_latents=prior, token_init=token_init, device=device)
    if world > 1:
        trainer.grad_sync = lambda params: [p.grad.copy_(acc.reduce(p.grad, "mean")) for p in params if p.grad is not None]

    os.makedirs(run["output_dir"], exist_ok=True)
    base = os.path.join(run["output_dir"], run["name"])
    state_path = base + (f".rank{rank}" if world > 1 else "") + ".state.safetensors"
    if run["resume"]:
        resume = run["resume"]
        if world > 1:  # each process resumes its own state: <name>.rank<r>.state.safetensors
            resume = re.sub(r"(\.rank\d+)?\.state\.safetensors$", f".rank{rank}.state.safetensors", resume)
            if not os.path.isfile(resume):
                raise SystemExit(f"cannot resume process {rank} of {world}: {resume} not found (resume with as many "
                                 "processes as the run that saved the state)")
        trainer.load(resume)

    def save_outputs(metadata):
        if not main_process:
            return
        export.save_lora(lora, base + ".safetensors", ldm_mapper(denoiser), metadata)
        if trainer.token is not None:
            export.save_embedding(trainer.token, base + ".embedding.safetensors")
        atomic_write_json(losses_table(trainer.history), base + ".losses.json")

    def progress(step, losses):
        if main_process:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    TrainingRun(trainer, state_path, save_outputs, checkpoint_every=run["checkpoint_every"], progress=progress).run()
    if world > 1:
        acc.end_training()  # destroys the process group: left to interpreter exit, gloo can abort the process
    if main_process:
        print(base + ".safetensors")
    return {"lora": base + ".safetensors", "state": state_path, "steps": trainer.step}


def prior_latents(run, config, denoiser, text, vae, lora, shape, device) -> torch.Tensor:
    """Class-image latents: encoded from ``prior_images`` or generated once by the frozen base model and cached in
    the output folder under a fingerprint of the UNet's weights (:func:`.run.class_latents`)."""
    if run["prior_images"]:
        return encode_latents(vae, load_pixels(run["prior_images"], run["resolution"])).to(device)
    schedule = denoiser.schedule
    model_id = fingerprint([*denoiser.unet.state_dict().items(), ("alphas_cumprod", schedule.alphas_cumprod)],
                           ["diffusers", schedule.prediction])
    return class_latents(denoiser, lora, text, config.fill(config.class_prompt), run["prior_count"], shape, config.seed,
                         device, run["output_dir"], model_id)


if __name__ == "__main__":
    main()
