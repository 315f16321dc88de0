"""Tier 1: the pack under bad input and faults (host-free parts): the one save path, the trainer's finite checks,
names, prompts, folders, input checks, malformed files, Cancel inside long loops."""
import os
import stat

import numpy as np
import pytest
import tiny_adapters
import torch
from PIL import Image
from safetensors.torch import load_file as st_load
from safetensors.torch import save_file as st_save

from comfyui_personalize.models import checkpoints, inputs
from comfyui_personalize.models.checkpoints import CheckpointError, ForeignFileError, NonFiniteError
from comfyui_personalize.models.ipadapter import IPAdapterModel, IPAEmbeds
from comfyui_personalize.training import export, run
from comfyui_personalize.training.diffusers_host import DiffusersDenoiser, unet_lora
from comfyui_personalize.training.lora import LoRASet
from comfyui_personalize.training.schedule import NoiseSchedule, scaled_linear_alphas_cumprod
from comfyui_personalize.training.trainer import TrainConfig, Trainer

SCHEDULE = NoiseSchedule(scaled_linear_alphas_cumprod(), "eps")


def text(prompts, token):
    return torch.cat([torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(len(p))) for p in prompts])


# ---------------------------------------------------------------------------------------------------------------
# The save path


def test_a_non_finite_tensor_is_never_written(tmp_path):
    path = str(tmp_path / "a.safetensors")
    checkpoints.atomic_save_safetensors({"x": torch.ones(3)}, path)
    with pytest.raises(NonFiniteError, match="x holds NaN"):
        checkpoints.atomic_save_safetensors({"x": torch.tensor([1.0, float("nan")])}, path)
    assert torch.equal(st_load(path)["x"], torch.ones(3))  # the good file stays
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_a_file_the_pack_did_not_write_is_not_replaced(tmp_path):
    theirs = str(tmp_path / "theirs.safetensors")
    st_save({"w": torch.zeros(2)}, theirs)  # e.g. a LoRA downloaded by the user
    with pytest.raises(ForeignFileError, match="not written by ComfyUI-Personalize"):
        checkpoints.atomic_save_safetensors({"w": torch.ones(2)}, theirs)
    assert torch.equal(st_load(theirs)["w"], torch.zeros(2))
    (tmp_path / "notes.safetensors").write_text("not even safetensors")
    with pytest.raises(ForeignFileError):
        checkpoints.atomic_save_safetensors({"w": torch.ones(2)}, str(tmp_path / "notes.safetensors"))
    checkpoints.atomic_save_safetensors({"w": torch.ones(2)}, theirs, overwrite=True)  # asked to
    assert torch.equal(st_load(theirs)["w"], torch.ones(2)) and checkpoints.written_by_pack(theirs)
    checkpoints.atomic_save_safetensors({"w": torch.full((2,), 2.0)}, theirs)  # ours now: replaced freely
    # files of earlier versions of the pack (no writer key) count as ours
    legacy = str(tmp_path / "legacy.safetensors")
    st_save({"w": torch.zeros(1)}, legacy, metadata={"personalize_format": "1"})
    assert checkpoints.written_by_pack(legacy)


def test_temp_files_are_hidden_unlisted_and_removed(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def failing_replace(src, dst):
        seen.append(os.path.basename(src))
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.atomic_save_safetensors({"x": torch.ones(1)}, str(tmp_path / "x.safetensors"))
    monkeypatch.setattr(checkpoints.os, "replace", real_replace)
    (tmp,) = seen
    assert tmp.startswith(".") and tmp.endswith(".partial")  # not a model extension: no loader lists it
    assert os.listdir(tmp_path) == []  # removed on failure


def test_files_get_the_users_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = checkpoints.atomic_save_safetensors({"x": torch.ones(1)}, str(tmp_path / "x.safetensors"))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # as ComfyUI's own outputs, not mkstemp's 0600
        os.umask(0o077)
        path = checkpoints.atomic_save_safetensors({"x": torch.ones(1)}, str(tmp_path / "y.safetensors"))
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        os.umask(old)


def test_names_are_checked_before_any_work():
    assert checkpoints.file_stem(" my dog/v1 ") == "my_dog_v1"
    with pytest.raises(ValueError, match="bytes long"):
        checkpoints.file_stem("x" * 300, "save_name")
    with pytest.raises(ValueError, match="empty"):
        checkpoints.file_stem("///", "save_name")


# ---------------------------------------------------------------------------------------------------------------
# Training


def make_trainer(tiny_unet, **overrides):
    unet = tiny_unet()
    config = TrainConfig(**{"steps": 4, "rank": 2, "seed": 0, "learning_rate": 1e-3, **overrides})
    lora = unet_lora(unet, config.targets, config.rank, config.alpha, config.seed)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return Trainer(DiffusersDenoiser(unet, SCHEDULE), lora, text, latents, config)


def test_a_non_finite_loss_keeps_the_last_good_lora_and_state(tmp_path, tiny_unet):
    trainer = make_trainer(tiny_unet)
    lora_path, state_path = str(tmp_path / "l.safetensors"), str(tmp_path / "l.state.safetensors")

    def poison(step, losses):
        if step == 2:
            trainer.latents[0, 0, 0, 0] = float("nan")  # one NaN pixel's worth, from step 3 on

    def save_outputs(meta):
        export.save_lora(trainer.lora, lora_path, metadata=meta)

    r = run.TrainingRun(trainer, state_path, save_outputs, checkpoint_every=1, progress=poison)
    with pytest.raises(FloatingPointError, match="the update was not applied"):
        r.run()
    assert trainer.step == 2
    saved = st_load(lora_path)
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.isfinite(p).all() for p in trainer.lora.parameters())  # the optimizer never touched them
    assert export.load_state(state_path)[1]["step"] == 2
    again = make_trainer(tiny_unet)
    again.load(state_path)  # resumable
    again.train()
    assert again.step == 4


def test_nan_options_are_refused():
    for field in ("learning_rate", "token_learning_rate", "sude_weight", "palp_alpha"):
        with pytest.raises(ValueError, match=f"{field} is nan"):
            TrainConfig(**{field: float("nan")})
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        TrainConfig(learning_rate=0.0)


def test_prompts_with_braces_are_kept():
    cfg = TrainConfig(token="sks", class_word="dog")
    assert cfg.fill("{subject} a photo of {token} {class_word}, {red|blue} collar") == \
        "{subject} a photo of sks dog, {red|blue} collar"


def test_resume_on_another_model_says_so():
    a = LoRASet({"input_blocks.1.1.attn1.to_q": (32, 32)}, rank=4)
    b = LoRASet({"input_blocks.4.1.attn1.to_q": (64, 64)}, rank=4)
    with pytest.raises(ValueError, match="another model"):
        b.load_lora_state(a.lora_state())
    c = LoRASet({"input_blocks.1.1.attn1.to_q": (64, 64)}, rank=4)
    with pytest.raises(ValueError, match="trained on another model"):
        c.load_lora_state(a.lora_state())


def counting(denoiser):
    calls = []

    def call(x, t, ctx):
        calls.append(1)
        return denoiser(x, t, ctx)
    call.schedule = denoiser.schedule
    return call, calls


def stop_after(n):
    seen = []

    def check():
        seen.append(1)
        if len(seen) > n:
            raise KeyboardInterrupt
    return check


def test_cancel_inside_class_images_and_validation(tmp_path, tiny_unet):
    unet = tiny_unet()
    lora = unet_lora(unet, ("attn2.to_k",), 2, None, 0)
    den, calls = counting(DiffusersDenoiser(unet, SCHEDULE))
    with pytest.raises(KeyboardInterrupt):
        run.class_latents(den, lora, text, "a photo of dog", 8, (4, 8, 8), 0, "cpu", str(tmp_path), "m", stop_after(3))
    assert len(calls) == 3 and os.listdir(tmp_path) == []  # stopped at once; nothing cached
    trainer = make_trainer(tiny_unet)
    trainer.denoiser, calls = counting(trainer.denoiser)
    with pytest.raises(KeyboardInterrupt):
        run.Validation(trainer, "a photo", 20, 7.5, 0, stop_after(2))()
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------------------------
# Folders


def test_image_folders_stay_in_the_input_folder(tmp_path):
    root = tmp_path / "input"
    (root / "dog").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "dog" / "a.png")
    os.symlink(tmp_path / "secret", root / "link")
    assert run.confined_folder("dog", str(root)) == os.path.realpath(root / "dog")
    for bad in ("..", "../secret", str(tmp_path / "secret"), "link", "/etc"):
        with pytest.raises(ValueError, match="inside ComfyUI's input folder") as e:
            run.confined_folder(bad, str(root))
        assert "secret" not in str(e.value).replace(bad, "")  # says nothing about what is outside
    with pytest.raises(FileNotFoundError, match="no folder 'cat'"):
        run.confined_folder("cat", str(root))
    files = run.image_files(str(root / "dog"))
    with pytest.raises(ValueError, match="at most 0"):
        run.check_image_files(files, max_files=0)
    with pytest.raises(ValueError, match="up to 4 px"):
        run.check_image_files(files, max_side=4)


# ---------------------------------------------------------------------------------------------------------------
# Input checks


@pytest.mark.parametrize("image, expected", [
    (torch.zeros(0, 64, 64, 3), "empty batch"),
    (torch.zeros(1, 1, 1, 3), "1x1 px"),
    (torch.zeros(1, 3, 64, 64), "channel-first"),
    (torch.zeros(64, 64, 3), "no batch dimension"),
    (torch.full((1, 64, 64, 3), 255.0), "0..255"),
    (torch.zeros(1, 64, 64, 3).index_fill_(1, torch.tensor([3]), float("nan")), "NaN"),
])
def test_image_checks(image, expected):
    with pytest.raises(ValueError, match=expected):
        inputs.check_image(image, "the subject images", min_side=64, multiple=8)


def test_mask_and_number_checks():
    assert inputs.check_mask(torch.ones(4, 5), "attn_mask").shape == (1, 4, 5)
    with pytest.raises(ValueError, match="attn_mask holds 1 NaN"):
        inputs.check_mask(torch.tensor([[1.0, float("nan")]]), "attn_mask")
    with pytest.raises(ValueError, match="start_at is nan"):
        inputs.check_number(float("nan"), "start_at", 0.0, 1.0)
    with pytest.raises(ValueError, match="between 0.0 and 1.0"):
        inputs.check_number(1.5, "end_at", 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Malformed files


def adapter_parts(seed=0):
    sd = tiny_adapters.adapter_state_dict("base", [32] * 16, 32, 24, seed=seed)
    return {k: v.clone() for k, v in sd["image_proj"].items()}, {k: v.clone() for k, v in sd["ip_adapter"].items()}


def test_malformed_adapters_name_the_key():
    proj, layers = adapter_parts()
    proj["proj.weight"] = proj["proj.weight"].reshape(-1)
    with pytest.raises(CheckpointError, match=r"image_proj.proj.weight has shape \(\d+,\)"):
        IPAdapterModel.from_parts(proj, layers)
    proj, layers = adapter_parts()
    layers["x.to_k_ip.weight"] = layers.pop("1.to_k_ip.weight")
    with pytest.raises(CheckpointError, match="'x.to_k_ip.weight'.*numbered"):
        IPAdapterModel.from_parts(proj, layers)
    proj, layers = adapter_parts()
    layers["7.to_v_ip.weight"] = torch.zeros(32, 5)
    with pytest.raises(CheckpointError, match=r"ip_adapter.7.to_v_ip.weight \(32, 5\)"):  # the file's key, not ours
        IPAdapterModel.from_parts(proj, layers)
    proj, layers = adapter_parts()
    layers["3.to_k_ip.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="ip_adapter.3.to_k_ip.weight holds NaN"):
        IPAdapterModel.from_parts(proj, layers)


def test_malformed_embeds_files_name_the_file(tmp_path):
    path = str(tmp_path / "e.ipaembeds.safetensors")
    meta = {"format": "personalize.ipadapter.embeds/1", "feature": "image_embeds"}
    st_save({"cond": torch.tensor(1.0), "uncond": torch.tensor(0.0)}, path, metadata=meta)
    with pytest.raises(CheckpointError, match="e.ipaembeds.safetensors.*2-D"):
        IPAEmbeds.load(path)
    st_save({"cond": torch.full((1, 4), float("nan")), "uncond": torch.zeros(1, 4)}, path, metadata=meta)
    with pytest.raises(CheckpointError, match="cond holds NaN"):
        IPAEmbeds.load(path)
