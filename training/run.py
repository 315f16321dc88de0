"""One run layer for every host that trains (the ComfyUI node, the command line): subject and class images, class
images generated once and cached under a key that names the model, validation samples, and the save / validate /
checkpoint / stop schedule around :meth:`.trainer.Trainer.train`. A host supplies the pieces only it knows (its
denoiser and text encoder, where files go, how a user cancels); everything it would otherwise write again is here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from . import export
from .sampling import PRIOR_GUIDANCE, PRIOR_SAMPLING_STEPS, ddim_sample
from .trainer import Trainer

log = logging.getLogger("personalize")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# What a folder named in a prompt may make the server read: this many images, each at most this many pixels a side
# (checked from the file headers before anything is decoded).
MAX_FOLDER_IMAGES = 100
MAX_IMAGE_SIDE = 4096
# Values of each tensor that enter a model fingerprint: all of a small tensor, this many evenly spaced ones of a
# large one (two checkpoints of one architecture differ in nearly every weight, so a sample tells them apart).
FINGERPRINT_SAMPLES = 4096
# Class images generated per sampler call.
PRIOR_CHUNK = 4


# ---------------------------------------------------------------------------------------------------------------
# Images


def image_files(spec: str | Sequence[str], recursive: bool = False, what: str = "subject") -> list[str]:
    """The image files of a folder (sorted, by extension; ``recursive``: sub-folders too) or of an explicit list;
    raises when there are none."""
    if isinstance(spec, str) and os.path.isdir(spec):
        if recursive:
            found = (os.path.join(d, f) for d, _, names in os.walk(spec) for f in names)
        else:
            found = (os.path.join(spec, f) for f in os.listdir(spec))
        files = sorted(f for f in found if f.lower().endswith(IMAGE_EXTENSIONS))
    else:
        files = [spec] if isinstance(spec, str) else list(spec)
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise FileNotFoundError(f"no {what} images found ({missing[:3] or spec}); give a folder of "
                                f"{', '.join(IMAGE_EXTENSIONS)} images or a list of files")
    return files


def confined_folder(folder: str, root: str, what: str = "image_folder") -> str:
    """``folder`` (relative to ``root``, or absolute) as a real path inside ``root`` (subfolders allowed, symlinks
    resolved). Anything outside is refused with a message that says nothing about the path beyond ``root``."""
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, folder))
    if os.path.commonpath([root, path]) != root:
        raise ValueError(f"{what} must be a folder inside ComfyUI's input folder (a subfolder such as 'my_dog'); "
                         f"{folder!r} is not")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: there is no folder {os.path.relpath(path, root)!r} in ComfyUI's input folder")
    return path


def check_image_files(files: Sequence[str], max_files: int = MAX_FOLDER_IMAGES, max_side: int = MAX_IMAGE_SIDE) -> None:
    """Refuse more than ``max_files`` images, or one larger than ``max_side`` on a side, from the headers alone."""
    from PIL import Image

    if len(files) > max_files:
        raise ValueError(f"{len(files)} images in the folder; at most {max_files} are read: use a folder with fewer")
    for f in files:
        with Image.open(f) as im:
            if max(im.size) > max_side:
                raise ValueError(f"{os.path.basename(f)} is {im.size[0]}x{im.size[1]} px; images up to {max_side} px "
                                 "a side are read: downscale it")


def load_images(files: Sequence[str], size: int | None = None) -> torch.Tensor:
    """RGB images as uint8 ``(N, H, W, 3)``. With ``size``: resized on the short side (bicubic) and centre-cropped
    to ``size x size``; without, they must all have one size already."""
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            if size is not None:
                s = size / min(im.size)
                im = im.resize((max(size, round(im.width * s)), max(size, round(im.height * s))), Image.BICUBIC)
                left, top = (im.width - size) // 2, (im.height - size) // 2
                im = im.crop((left, top, left + size, top + size))
            out.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(im.height, im.width, 3))
    sizes = sorted({tuple(a.shape[:2]) for a in out})
    if len(sizes) > 1:
        folder = os.path.dirname(files[0]) or "."
        raise ValueError(f"the images in {folder} have different sizes (height, width) {sizes}; crop them to one "
                         "size (e.g. 512x512)")
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# Class images (DreamBooth prior preservation), generated once per model and cached


def fingerprint(tensors: Iterable[tuple[str, torch.Tensor]], extra: Sequence = ()) -> str:
    """A short hex digest of named tensors (names, shapes, dtypes and up to :data:`FINGERPRINT_SAMPLES` evenly
    spaced values of each) and of ``extra`` (JSON-able values): what tells one model's weights from another's."""
    h = hashlib.sha256(json.dumps(list(extra), default=str).encode())
    for name, t in tensors:
        flat = t.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:
            flat = flat[:: flat.numel() // FINGERPRINT_SAMPLES][:FINGERPRINT_SAMPLES]
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(flat.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def class_latents(denoiser: Callable, lora, encode: Callable, prompt: str, count: int, shape: Sequence[int], seed: int,
                  device, cache_dir: str, model_id: str | None, check_stop: Callable[[], None] | None = None) -> torch.Tensor:
    """``count`` class images (latents ``(count, *shape)``) from the frozen base model (LoRA off) on ``prompt``:
    DDIM, guidance and steps of the SuDe / DreamBooth reference (:mod:`.sampling`).

    Cached in ``cache_dir`` under a key of the model (``model_id``: a :func:`fingerprint` of its weights), the
    prompt, count, latent shape, seed and sampler settings, so another model never reuses these images; with
    ``model_id`` None (a model whose state cannot be fingerprinted) nothing is cached. ``check_stop`` is called at every
    sampler step (it raises to stop: nothing is cached then)."""
    path = None
    if model_id is not None:
        key = hashlib.sha256(json.dumps([model_id, prompt, int(count), list(shape), int(seed), PRIOR_SAMPLING_STEPS,
                                         PRIOR_GUIDANCE]).encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"prior_{key}.safetensors")
        if os.path.isfile(path):
            log.info("class images: cached %s", path)
            return export.load_file(path)["latents"].to(device)
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(int(count), *shape, generator=g).to(device)
    with torch.no_grad():
        cond, uncond = encode([prompt], None), encode([""], None)
        with lora.disabled():
            latents = torch.cat([ddim_sample(denoiser, denoiser.schedule, noise[i:i + PRIOR_CHUNK], cond, uncond,
                                             PRIOR_SAMPLING_STEPS, PRIOR_GUIDANCE, check_stop=check_stop)
                                 for i in range(0, noise.shape[0], PRIOR_CHUNK)])
    if path is not None:
        export.atomic_save_safetensors({"latents": latents}, path)
    return latents


# ---------------------------------------------------------------------------------------------------------------
# Validation samples


class Validation:
    """Samples of the model being trained on one prompt from fixed noise (the same noise at every call, so the
    samples show the run's progress); each sample's latent goes to ``on_sample`` (e.g. a live preview and the host's
    collection) and is returned."""

    def __init__(self, trainer: Trainer, prompt: str, steps: int, guidance: float, seed: int,
                 check_stop: Callable[[], None] | None = None, progress: Callable[[int, int], None] | None = None,
                 on_sample: Callable[[torch.Tensor], None] | None = None):
        self.trainer, self.prompt, self.steps, self.guidance = trainer, prompt, int(steps), float(guidance)
        self.check_stop, self.progress, self.on_sample = check_stop, progress, on_sample
        g = torch.Generator().manual_seed(int(seed))
        self.noise = torch.randn(1, *trainer.latents.shape[1:], generator=g).to(trainer.device)

    def __call__(self) -> torch.Tensor | None:
        if not self.steps:
            return None
        tr = self.trainer
        with torch.no_grad():
            ctx = tr.context([self.prompt]), tr.context([""])
            latent = ddim_sample(tr.denoiser, tr.schedule, self.noise, *ctx, self.steps, self.guidance,
                                 check_stop=self.check_stop, progress=self.progress)
        if self.on_sample is not None:
            self.on_sample(latent)
        return latent


# ---------------------------------------------------------------------------------------------------------------
# The run


class TrainingRun:
    """:meth:`Trainer.train` with the schedule every host wants.

    After each step: ``progress(step, losses)``; every ``checkpoint_every`` steps :meth:`save`; every ``validate_every``
    steps (not the last) ``validate()``; then ``check_stop()``, which raises to stop (ComfyUI's Cancel). However
    the loop ends, :meth:`save` runs: the host's outputs (``save_outputs(metadata)``: LoRA, token) and the resumable
    state at ``state_path`` (``overwrite``: a file there that the pack did not write may be replaced). A step whose
    loss or gradient is not finite raises before the update (:meth:`Trainer.train_step`), so what is saved then is
    the last good state. When the loop ended early (Cancel, an error), ``on_stop(step, error)`` runs after the save
    (the host says what was saved)."""

    def __init__(self, trainer: Trainer, state_path: str, save_outputs: Callable[[Mapping[str, str]], None],
                 metadata: Mapping[str, str] | None = None, checkpoint_every: int = 0,
                 validate: Callable[[], None] | None = None, validate_every: int = 0,
                 progress: Callable[[int, Mapping[str, float]], None] | None = None, check_stop: Callable[[], None] | None = None,
                 overwrite: bool = False, on_stop: Callable[[int, BaseException], None] | None = None):
        self.trainer, self.state_path, self.save_outputs = trainer, state_path, save_outputs
        self.metadata = dict(metadata or {})
        self.checkpoint_every, self.validate, self.validate_every = int(checkpoint_every), validate, int(validate_every)
        self.progress, self.check_stop, self.overwrite, self.on_stop = progress, check_stop, overwrite, on_stop

    def save(self) -> None:
        self.save_outputs({**self.metadata, "steps": str(self.trainer.step)})
        self.trainer.save(self.state_path, overwrite=self.overwrite)

    def on_step(self, step: int, losses: Mapping[str, float]) -> None:
        if self.progress is not None:
            self.progress(step, losses)
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            self.save()
        if self.validate is not None and self.validate_every and step % self.validate_every == 0 \
                and step < self.trainer.config.steps:
            self.validate()
        if self.check_stop is not None:
            self.check_stop()

    def run(self) -> None:
        stopped = None
        try:
            self.trainer.train(callback=self.on_step)
        except BaseException as err:
            stopped = err
            raise
        finally:  # also on Cancel or an error: the outputs so far and a state to resume from
            self.save()
            if stopped is not None and self.on_stop is not None:
                self.on_stop(self.trainer.step, stopped)
