"""Pretrain an E4T encoder (head + weight offsets) on a folder of domain images with a diffusers SD1.x model, from a
config file (JSON, or YAML when PyYAML is installed): mkshing/e4t-diffusion ``pretrain_e4t.py``'s recipe.

    python training/e4t_pretrain.py --config run.json            # one device
    accelerate launch --multi_gpu --num_processes 2 training/e4t_pretrain.py --config run.json  # 2 processes

(As ``training/cli.py``: without GPUs the processes run on the CPU, gloo; each process draws its own images, crops,
timesteps and noise; gradients are averaged over the processes.)

The config::

    {"model": "path/to/stable-diffusion-v1-5",        # diffusers layout: unet, vae, text_encoder, tokenizer, scheduler
     "clip_vision": "path/to/CLIP-ViT-H-14-laion2B-s32B-b79K",  # a transformers CLIPVisionModel (or CLIPModel) folder
     "init": null,                                    # or an E4T folder to continue from (head, offsets, CLIP tower)
     "images": "path/to/faces",                       # a folder (sub-folders included) or a list of image files
     "output_dir": "out", "name": "e4t-faces", "resolution": 512,
     "class_word": "face", "placeholder_token": "*s", "prompt_template": "face",   # normal / face / art / a template
     "domain_embed_scale": 0.1, "checkpoint_every": 10000, "resume": null,
     "train": {"steps": 30000, "batch_size": 16, "learning_rate": 1.6e-5, "reg_lambda": 0.01, "seed": 0}}

One step (the reference's): fresh crops of ``batch_size`` images (shortest side resized to ``resolution`` with area
interpolation, a random ``resolution`` square, a horizontal flip half the time); VAE latents sampled from the
posterior times the scaling factor; ``t ~ U{0..T-1}``; a template drawn per image; the feature pass of the model being
trained on the empty prompt; ``e = E(class word) + scale * head(CLIP(image), features)`` in the placeholder slot;
``loss = MSE(eps_hat, eps) + reg_lambda * sum(e^2)``; AdamW (weight decay 0.01) on the head and the offsets at a
constant learning rate, no gradient clipping. The UNet, VAE, text encoder and CLIP tower are frozen.

Outputs: ``<output_dir>/<name>/`` (``config.json`` with the reference's keys, ``encoder.safetensors``: the head and the
CLIP tower as ``clip_vision.*`` in open_clip keys, ``weight_offsets.safetensors``: the reference's tensors and key
names; mkshing's scripts open ``encoder.pt`` / ``weight_offsets.pt``, a ``torch.save`` of the same dicts), which the
pack's E4T loader reads; ``<output_dir>/<name>.state.safetensors`` (resumable; with several processes one per process,
``<name>.rank<r>.state.safetensors``: resume with as many processes and ``"resume": "<name>.state.safetensors"``);
``<output_dir>/<name>.losses.json`` (process 0's losses).
"""
from __future__ import annotations

import argparse
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

from ..models import e4t  # noqa: E402
from ..models.checkpoints import atomic_write_json  # noqa: E402
from . import e4t_diffusers as host  # noqa: E402
from .cli import _accelerator, read_config  # noqa: E402
from .diffusers_host import DiffusersDenoiser  # noqa: E402
from .e4t import E4TTrainConfig, E4TTrainer  # noqa: E402
from .run import TrainingRun, image_files  # noqa: E402
from .trainer import losses_table  # noqa: E402

log = logging.getLogger("personalize")

# mkshing pretrain_e4t.py argparse defaults: --checkpointing_steps 10000, --resolution 512.
CHECKPOINT_EVERY = 10000
RESOLUTION = 512
RUN_DEFAULTS = {"clip_vision": None, "init": None, "output_dir": ".", "name": "e4t", "resolution": None,
                "class_word": None, "placeholder_token": None, "prompt_template": None, "domain_embed_scale": None,
                "checkpoint_every": CHECKPOINT_EVERY, "resume": None}
# Pretraining values of the train section (pretrain_e4t.py: reg_lambda 0.01, no clipping, 30k steps for faces);
# the rest are E4TTrainConfig's (lr 1.6e-5, batch 16, AdamW weight decay 0.01).
TRAIN_DEFAULTS = {"steps": e4t.PRETRAIN_STEPS, "reg_lambda": e4t.PRETRAIN_REG_LAMBDA, "max_grad_norm": 0.0,
                  "mode": "pretrain"}
TOP_LEVEL_ONLY = {"templates": "prompt_template", "placeholder": "prompt_template",
                  "domain_embed_scale": "domain_embed_scale", "mode": None}
RESIZE_FILTER, FLIP_P = e4t.RESIZE_FILTER, e4t.FLIP_P  # the reference's augmentation (models/e4t.py reference_crop)


# ---------------------------------------------------------------------------------------------------------------
# Config


def load_run(path: str) -> dict:
    """The run config with defaults; refuses unknown keys and what cannot run, before any model is loaded."""
    cfg = read_config(path)
    if not isinstance(cfg, dict):
        raise SystemExit(f"{path}: expected a mapping of settings, got {type(cfg).__name__}")
    known = set(RUN_DEFAULTS) | {"model", "images", "train"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
    for key in ("model", "images"):
        if not cfg.get(key):
            raise SystemExit(f"{path}: '{key}' is required (see python training/e4t_pretrain.py --help)")
    run = {**RUN_DEFAULTS, **cfg}
    if not run["clip_vision"] and not run["init"]:
        raise SystemExit(f"{path}: give 'clip_vision' (a transformers CLIPVisionModel folder, e.g. "
                         "laion/CLIP-ViT-H-14-laion2B-s32B-b79K) or 'init' (an E4T folder with its CLIP tower)")
    train = run.get("train") or {}
    if not isinstance(train, dict):
        raise SystemExit(f"{path}: 'train' must be a mapping of E4TTrainConfig fields")
    for key, top in TOP_LEVEL_ONLY.items():
        if key in train:
            where = f"set the top-level '{top}' instead" if top else "it is always 'pretrain' here"
            raise SystemExit(f"{path}: train.{key} is not set in the train section: {where}")
    ce = run["checkpoint_every"]
    if not isinstance(ce, int) or isinstance(ce, bool) or ce < 0:
        raise SystemExit(f"{path}: checkpoint_every must be a whole number >= 0 (0: only at the end), got {ce!r}")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", str(run["name"])) or str(run["name"]).startswith("."):
        raise SystemExit(f"{path}: name {run['name']!r} must be a plain folder name (letters, digits, . _ -)")
    return run


def settings(run: dict, init: e4t.E4TWeights | None, path: str) -> dict:
    """Class word, placeholder, template, scale and resolution: the config's, else the init folder's, else the
    reference's defaults; checked."""
    src = init.config if init is not None else None
    out = {
        "class_word": run["class_word"] or (src.domain_class_token if src else None),
        "placeholder_token": run["placeholder_token"] or (src.placeholder_token if src else e4t.PLACEHOLDER_TOKEN),
        "prompt_template": run["prompt_template"] or (src.prompt_template if src else "face"),
        "domain_embed_scale": (run["domain_embed_scale"] if run["domain_embed_scale"] is not None
                               else (src.domain_embed_scale if src else e4t.DOMAIN_EMBED_SCALE)),
        "resolution": run["resolution"] or (int(src.raw.get("resolution") or RESOLUTION) if src else RESOLUTION),
    }
    if not out["class_word"] or not isinstance(out["class_word"], str):
        raise SystemExit(f"{path}: 'class_word' is required (the domain's one-token class word, e.g. 'face')")
    p = out["placeholder_token"]
    if not isinstance(p, str) or not p or any(c.isspace() for c in p):
        raise SystemExit(f"{path}: placeholder_token must be one word without spaces (the reference's '*s'), got {p!r}")
    try:
        out["templates"] = e4t.E4TConfig(prompt_template=str(out["prompt_template"])).templates()
    except ValueError as err:
        raise SystemExit(f"{path}: {err}") from None
    bad = [t for t in out["templates"] if t.count(host.PLACEHOLDER) != 1]
    if bad:
        raise SystemExit(f"{path}: each prompt template needs exactly one {host.PLACEHOLDER}; {bad[0]!r} does not")
    try:
        out["domain_embed_scale"] = float(out["domain_embed_scale"])
        out["resolution"] = int(out["resolution"])
    except (TypeError, ValueError):
        raise SystemExit(f"{path}: domain_embed_scale must be a number and resolution a whole number") from None
    if out["resolution"] < 8:
        raise SystemExit(f"{path}: resolution {out['resolution']} is too small")
    return out


def train_config(run: dict, s: dict, steps: int | None, path: str) -> E4TTrainConfig:
    train = {**TRAIN_DEFAULTS, **(run.get("train") or {}), "templates": s["templates"],
             "domain_embed_scale": s["domain_embed_scale"]}
    if steps is not None:
        train["steps"] = steps
    try:
        return E4TTrainConfig.from_dict(train)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"{path}: train: {err}") from None


# ---------------------------------------------------------------------------------------------------------------
# Data


def domain_files(spec) -> list[str]:
    """The images of a folder (sub-folders included, sorted, as the reference lists them) or of a list."""
    try:
        return image_files(spec, recursive=True, what="domain")
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from None


class DomainImages:
    """Fresh augmented crops of the domain images at every step (the reference's ``E4TDataset``): the short side
    resized to ``resolution`` (:data:`RESIZE_FILTER`), a random square crop, a horizontal flip with p 0.5, to
    [-1, 1]. Which images a step takes follows one shuffled order per epoch from ``seed`` (the same on every
    process); process ``rank`` of ``world`` takes its own ``batch`` positions of it, so the processes see different
    images at a step. The crops and flips are drawn from the trainer's generator (saved with its state)."""

    def __init__(self, files, resolution: int, seed: int, rank: int = 0, world: int = 1):
        self.files, self.resolution = list(files), int(resolution)
        self.seed, self.rank, self.world = int(seed), int(rank), int(world)
        self._epoch, self._order = None, None

    def order(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.files), generator=g)
        return self._order

    def indices(self, step: int, batch: int) -> list[int]:
        start = (step * self.world + self.rank) * batch
        n = len(self.files)
        return [int(self.order(p // n)[p % n]) for p in range(start, start + batch)]

    def augment(self, path: str, generator: torch.Generator) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as im:
            im = im.convert("RGB")
        return e4t.reference_crop(im, self.resolution, generator)

    def pixels(self, step: int, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.stack([self.augment(self.files[i], generator) for i in self.indices(step, batch)])


def make_batch_fn(images: DomainImages, vae, vision, trainer_ref: list, device):
    """``batch_fn(batch, generator) -> (latents, clip inputs)`` for :class:`~.e4t.E4TTrainer`: the step's crops, their
    VAE latents sampled from the posterior (``mean + std * noise`` from the generator) times the scaling factor
    (reference: ``latent_dist.sample() * scaling_factor``) and their CLIP inputs (frozen tower, no gradient)."""
    vp = next(vae.parameters())

    @torch.no_grad()
    def batch_fn(batch: int, generator: torch.Generator):
        px = images.pixels(trainer_ref[0].step, batch, generator).to(device)
        dist = vae.encode(px.to(vp.dtype)).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
        latents = (dist.mean + dist.std * noise).float() * vae.config.scaling_factor
        return latents, host.clip_vision_inputs(vision, px)
    return batch_fn


# ---------------------------------------------------------------------------------------------------------------
# Models


def check_head(head: e4t.E4THead, channels: int, vision, word_dim: int, what: str) -> None:
    cfg = vision.config
    n = e4t.n_clip_inputs((cfg.image_size // cfg.patch_size) ** 2)
    want = {"UNet feature channels": (head.feature_channels, channels), "CLIP inputs": (head.n_inputs, n),
            "CLIP width": (head.hidden, cfg.hidden_size), "word width": (head.word_dim, word_dim)}
    bad = [f"{k} {have} (this model: {need})" for k, (have, need) in want.items() if have != need]
    if bad:
        raise SystemExit(f"{what}'s E4T head does not fit these models: {', '.join(bad)}; it was trained for another "
                         "UNet, text encoder or CLIP tower")


def load_vision(run: dict, init: e4t.E4TWeights | None, path: str):
    """The frozen CLIP tower: the init folder's weights when given (in the architecture of ``clip_vision`` when
    that is given too, else derived from the weights), else the ``clip_vision`` folder's."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    if run["clip_vision"]:
        vision = CLIPVisionModel.from_pretrained(run["clip_vision"], dtype=torch.float32)
    else:
        try:
            vision = CLIPVisionModel(CLIPVisionConfig(**host.vision_config_from_open_clip(init.clip_vision)))
        except ValueError as err:
            raise SystemExit(f"{path}: init {run['init']}: {err}") from None
    if init is not None:
        try:
            host.load_open_clip_tower(vision, init.clip_vision, f"the CLIP tower of {run['init']}")
        except ValueError as err:
            raise SystemExit(f"{path}: {err}") from None
    return vision.eval().requires_grad_(False)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", required=True, help="JSON or YAML run config")
    ap.add_argument("--steps", type=int, help="override train.steps")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    run = load_run(args.config)
    init = None
    if run["init"]:
        try:
            init = e4t.load_e4t(run["init"])
        except (ValueError, OSError) as err:
            raise SystemExit(f"{args.config}: init: {err}") from None
        if init.offsets is None:
            raise SystemExit(f"{args.config}: init {run['init']} is a tuned E4T whose offsets are baked into a UNet; "
                             "continue pretraining from a pretrained E4T folder (with weight_offsets)")
    s = settings(run, init, args.config)
    config = train_config(run, s, args.steps, args.config)
    files = domain_files(run["images"])

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model = run["model"]
    # the text side first: a class word of several tokens or a template too long is refused before the rest loads
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float32)
    text = host.SlotTextEncoder(tokenizer, text_encoder, config.placeholder)
    try:
        for t in s["templates"]:
            text.layout(t)
        class_embed = text.word_embedding(s["class_word"])
    except ValueError as err:
        raise SystemExit(f"{args.config}: {err}") from None

    acc = _accelerator()
    device = acc.device if acc is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    main_process = rank == 0
    frozen_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    text_encoder.to(device, frozen_dtype)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").to(device).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").to(device, frozen_dtype).requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    vision = load_vision(run, init, args.config).to(device, frozen_dtype)

    factor = 2 ** (len(vae.config.block_out_channels) - 1) * 2 ** (len(unet.down_blocks) - 1)
    if s["resolution"] % factor:
        raise SystemExit(f"{args.config}: resolution {s['resolution']} must be a multiple of {factor} (the VAE's and "
                         "the UNet's downsampling)")
    word_dim = text_encoder.get_input_embeddings().embedding_dim
    if word_dim != unet.config.cross_attention_dim:
        raise SystemExit(f"{args.config}: the text encoder is {word_dim} wide, the UNet's cross-attention "
                         f"{unet.config.cross_attention_dim}: not one SD model")

    channels = host.feature_channels(unet)
    shapes = host.offset_shapes(unet)
    if init is not None:
        head, offsets = init.head, init.offsets
        check_head(head, channels, vision, word_dim, run["init"])
        if offsets.shapes() != shapes:
            raise SystemExit(f"{args.config}: the weight offsets of {run['init']} cover {len(offsets.names)} "
                             f"projections, this UNet has {len(shapes)} (or other sizes): made for another UNet")
    else:  # the same initial weights on every process (the base seed; the batches use seed + rank)
        cv = vision.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            head = e4t.E4THead(channels, cv.hidden_size, e4t.n_clip_inputs((cv.image_size // cv.patch_size) ** 2),
                               word_dim)
        offsets = e4t.OffsetSet(shapes, seed=config.seed)
    head, offsets = head.float().to(device), offsets.float().to(device)
    host.attach_offsets(unet, offsets)

    with torch.no_grad():
        empty = text.plain([""])

    def features(x_t, t):
        return e4t.pool_features(host.unet_features(unet, x_t, t, empty.expand(x_t.shape[0], -1, -1)))

    if main_process:
        log.info("E4T pretraining: %d images, %d process(es) x batch %d, head %.2fM + offsets %.2fM parameters, "
                 "%d steps", len(files), world, config.batch_size, sum(p.numel() for p in head.parameters()) / 1e6,
                 sum(p.numel() for p in offsets.parameters()) / 1e6, config.steps)
    denoiser = DiffusersDenoiser.from_scheduler(unet, scheduler)
    images = DomainImages(files, s["resolution"], config.seed, rank, world)
    trainer_ref = []
    batch_fn = make_batch_fn(images, vae, vision, trainer_ref, device)
    proc_config = E4TTrainConfig.from_dict({**config.to_dict(), "seed": config.seed + rank}) if world > 1 else config
    trainer = E4TTrainer(denoiser, features, text, head, offsets, None, None, class_embed, proc_config, device=device,
                         batch_fn=batch_fn)
    trainer_ref.append(trainer)
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
        try:
            trainer.load(resume)
        except ValueError as err:
            raise SystemExit(f"{args.config}: {err}") from None

    # the tower's weights: the init folder's when given (it may have been trained there: unfreeze_clip_vision), else
    # the clip_vision folder's; it stays frozen here
    clip_source = ((init.config.raw.get("clip_model_name_or_path") or run["init"]) if init is not None
                   else run["clip_vision"])
    clip_trained = bool(init is not None and init.config.unfreeze_clip_vision)
    clip_sd = None

    def save_outputs(metadata):
        nonlocal clip_sd
        if not main_process:
            return
        if clip_sd is None:  # frozen: converted once
            clip_sd = {k: v.detach().float().cpu().contiguous()
                       for k, v in host.transformers_to_open_clip(vision.state_dict()).items()}
        out_config = {
            "pretrained_model_name_or_path": model, "clip_model_name_or_path": clip_source,
            "placeholder_token": s["placeholder_token"], "domain_class_token": s["class_word"],
            "domain_embed_scale": s["domain_embed_scale"], "reg_lambda": config.reg_lambda,
            "prompt_template": s["prompt_template"], "train_image_dataset": run["images"],
            "unfreeze_clip_vision": clip_trained, "resolution": s["resolution"], "seed": config.seed,
            "learning_rate": config.learning_rate, "train_batch_size": config.batch_size,
            "max_train_steps": config.steps, "max_grad_norm": config.max_grad_norm,
            "mixed_precision": config.mixed_precision, "lr_scheduler": "constant",
            "personalize_steps_done": trainer.step, "personalize_init": run["init"],
        }
        e4t.save_e4t(base, out_config, head, offsets, clip_sd)
        atomic_write_json(losses_table(trainer.history), base + ".losses.json")

    def progress(step, losses):
        if main_process:
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))

    TrainingRun(trainer, state_path, save_outputs, checkpoint_every=run["checkpoint_every"], progress=progress).run()
    if world > 1:
        acc.end_training()  # destroys the process group: left to interpreter exit, gloo can abort the process
    if main_process:
        print(base)
    return {"e4t": base, "state": state_path, "steps": trainer.step}


if __name__ == "__main__":
    main()
