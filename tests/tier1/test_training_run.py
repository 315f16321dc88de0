"""Tier 1: the run layer shared by the trainer node and the command line (training/run.py)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_personalize.training import export, run
from comfyui_personalize.training.diffusers_host import DiffusersDenoiser, unet_lora
from comfyui_personalize.training.schedule import NoiseSchedule, scaled_linear_alphas_cumprod
from comfyui_personalize.training.trainer import TrainConfig, Trainer


def test_fingerprint_tells_models_apart():
    g = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(64, 128, generator=g), "b": torch.randn(7, generator=g)}
    fp = run.fingerprint(a.items())
    assert fp == run.fingerprint({k: v.clone() for k, v in a.items()}.items())
    other = {k: v.clone() for k, v in a.items()}
    other["w"][0, 0] += 1e-3  # a sampled value of a large tensor
    assert run.fingerprint(other.items()) != fp
    other = {k: v.clone() for k, v in a.items()}
    other["b"][3] += 1e-3  # any value of a small tensor
    assert run.fingerprint(other.items()) != fp
    assert run.fingerprint({"v": a["w"], "b": a["b"]}.items()) != fp  # names count
    assert run.fingerprint(a.items(), ["SDXL"]) != fp  # and the extra description
    assert run.fingerprint({"w": a["w"].half(), "b": a["b"]}.items()) != fp  # and dtypes


def write_image(path, w, h, value):
    Image.fromarray(np.full((h, w, 3), value, dtype=np.uint8)).save(path)


def test_images_from_a_folder(tmp_path):
    write_image(tmp_path / "b.png", 40, 30, 20)
    write_image(tmp_path / "a.jpg", 40, 30, 200)
    (tmp_path / "notes.txt").write_text("not an image")
    files = run.image_files(str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["a.jpg", "b.png"]
    imgs = run.load_images(files)
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 30, 40, 3) and int(imgs[1, 0, 0, 0]) == 20
    assert run.load_images(files, 16).shape == (2, 16, 16, 3)  # resized on the short side, centre-cropped
    write_image(tmp_path / "c.png", 30, 30, 0)
    with pytest.raises(ValueError, match="different sizes"):
        run.load_images(run.image_files(str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="no subject images"):
        run.image_files(str(tmp_path / "missing"))


SCHEDULE = NoiseSchedule(scaled_linear_alphas_cumprod(), "eps")


def text(prompts, token):
    return torch.cat([torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(len(p))) for p in prompts])


def test_class_latents_are_cached_per_model(tmp_path, tiny_unet):
    unet = tiny_unet()
    lora = unet_lora(unet, ("attn2.to_k",), 2, None, 0)
    den = DiffusersDenoiser(unet, SCHEDULE)
    args = ("a photo of dog", 3, (4, 8, 8), 0, "cpu", str(tmp_path))
    a = run.class_latents(den, lora, text, *args, "model-a")
    assert a.shape == (3, 4, 8, 8) and len(os.listdir(tmp_path)) == 1
    with torch.no_grad():
        lora.deltas[next(iter(lora.deltas))].up.fill_(1.0)  # the LoRA is off while class images are made
    assert torch.equal(run.class_latents(den, lora, text, *args, "model-a"), a)  # read back from the cache
    b = run.class_latents(den, lora, text, *args, "model-b")
    assert torch.equal(a, b) and len(os.listdir(tmp_path)) == 2  # another model: its own file
    run.class_latents(den, lora, text, *args, None)
    assert len(os.listdir(tmp_path)) == 2  # not cacheable: nothing written


def test_run_schedule_and_stop(tmp_path, tiny_unet):
    """progress / checkpoint / validate after each step, the stop check last; however the loop ends, the outputs
    and the state are saved at the step reached."""
    unet = tiny_unet()
    config = TrainConfig(steps=5, rank=2, seed=0)
    lora = unet_lora(unet, config.targets, config.rank, config.alpha, config.seed)
    trainer = Trainer(DiffusersDenoiser(unet, SCHEDULE), lora, text, torch.randn(2, 4, 8, 8), config)
    events = []

    def stop():
        events.append(("stop", trainer.step))
        if trainer.step == 4:
            raise KeyboardInterrupt

    state = str(tmp_path / "x.state.safetensors")
    r = run.TrainingRun(trainer, state, lambda meta: events.append(("save", meta["steps"], meta["token"])),
                        {"token": "sks"}, checkpoint_every=2, validate=lambda: events.append(("validate", trainer.step)),
                        validate_every=3, progress=lambda step, losses: events.append(("progress", step, sorted(losses))),
                        check_stop=stop)
    with pytest.raises(KeyboardInterrupt):
        r.run()
    names = [e[0] for e in events]
    assert names == ["progress", "stop", "progress", "save", "stop", "progress", "validate", "stop",
                     "progress", "save", "stop", "save"]
    assert events[0][2] == ["reconstruction", "total"] and events[-1][1] == "4"
    assert export.load_state(state)[1]["step"] == 4
