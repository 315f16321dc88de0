"""Tier 1: the E4T pretraining command line (training/e4t_pretrain.py) on a tiny diffusers SD1.x folder, a tiny
CLIPVisionModel folder and a few faces of scikit-image's LFW subset: 2 steps as 2 CPU processes (accelerate launch,
gloo), an output folder the pack's E4T loader reads, a resume that continues the step count, and the refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tier1.test_e4t_diffusers import CROSS, one_thread, tiny_text_encoder, tiny_vision, write_tokenizer  # noqa: F401

from comfyui_personalize.models import e4t
from comfyui_personalize.training import e4t_diffusers as host
from comfyui_personalize.training import e4t_pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "training", "e4t_pretrain.py")
N_FACES = 6  # of skimage.data.lfw_subset(): the first 100 are faces (25 x 25 gray)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_unet):
    """A tiny SD1.x folder (save_pretrained layout, the tokenizer makes 'face' one token), a tiny CLIP vision
    folder (224 px, patch 14: 129 head inputs as ViT-H-14) and N_FACES face PNGs upsampled to 48 x 40 RGB."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from skimage import data

    root = tmp_path_factory.mktemp("tiny_e4t")
    tiny_unet(cross_attention_dim=CROSS).save_pretrained(root / "sd" / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(root / "sd" / "vae")
    n_vocab = write_tokenizer(str(root / "sd" / "tokenizer"))
    tiny_text_encoder(n_vocab).save_pretrained(root / "sd" / "text_encoder")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(root / "sd" / "scheduler")
    tiny_vision(seed=1).save_pretrained(root / "clip")
    faces = data.lfw_subset()[:N_FACES]
    (root / "faces").mkdir()
    for i, f in enumerate(faces):
        im = Image.fromarray((f * 255).round().astype(np.uint8)).convert("RGB").resize((40, 48), Image.BICUBIC)
        im.save(root / "faces" / f"{i}.png")
    return root


def run_config(root, out, **over):
    return {"model": str(root / "sd"), "clip_vision": str(root / "clip"), "images": str(root / "faces"),
            "output_dir": str(out), "name": "faces", "resolution": 16, "class_word": "face", "prompt_template": "face",
            "checkpoint_every": 0, "train": {"steps": 2, "batch_size": 2, "seed": 5, "learning_rate": 1e-3}, **over}


def launch(config_path, home, processes=2, *extra):
    """As test_training_cli.launch_two_processes: accelerate launch with the GPUs hidden, hermetic (no accelerate
    config file, no ACCELERATE_* variable)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH="", HF_HOME=str(home), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, SCRIPT]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               SCRIPT]
    return subprocess.run(cmd + ["--config", str(config_path), "-v", *extra], capture_output=True, text=True, env=env,
                          timeout=600)


def fresh_init(root, seed):
    """The head and offsets a run with ``seed`` starts from (built as the CLI builds them)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModel

    unet = UNet2DConditionModel.from_pretrained(str(root / "sd"), subfolder="unet")
    cv = CLIPVisionModel.from_pretrained(str(root / "clip")).config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = e4t.E4THead(host.feature_channels(unet), cv.hidden_size, e4t.n_clip_inputs(256), CROSS)
    return head, e4t.OffsetSet(host.offset_shapes(unet), seed=seed)


def test_pretrain_two_processes_write_an_e4t_folder(tiny_run, tmp_path):
    pytest.importorskip("accelerate", reason="multi-process training runs through accelerate (pip install accelerate)")
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    from comfyui_personalize.training import export

    out = tmp_path / "out"
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_config(tiny_run, out)))
    r = launch(path, tmp_path / "hf")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "process 1 of 2 (DistributedType.MULTI_CPU" in r.stderr, r.stderr[-3000:]
    folder = out / "faces"
    assert r.stdout.strip().splitlines()[-1] == str(folder)

    w = e4t.load_e4t(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    assert {k: cfg[k] for k in ("placeholder_token", "domain_class_token", "domain_embed_scale", "prompt_template",
                                "reg_lambda", "resolution", "unfreeze_clip_vision")} == \
        {"placeholder_token": "*s", "domain_class_token": "face", "domain_embed_scale": 0.1, "prompt_template": "face",
         "reg_lambda": 0.01, "resolution": 16, "unfreeze_clip_vision": False}
    assert cfg["learning_rate"] == 1e-3 and cfg["pretrained_model_name_or_path"] == str(tiny_run / "sd")
    assert cfg["clip_model_name_or_path"] == str(tiny_run / "clip")
    assert w.head.n_inputs == 129 and w.head.word_dim == CROSS and len(w.offsets.names) == 24
    head0, offsets0 = fresh_init(tiny_run, seed=5)
    assert w.head.feature_channels == head0.feature_channels
    for name, v in head0.state_dict().items():
        assert not torch.equal(w.head.state_dict()[name], v), f"head {name} did not change"
    changed = [n for n, g in offsets0.items() if not torch.equal(w.offsets[n].linear_row.weight, g.linear_row.weight)]
    assert len(changed) == 24
    # the CLIP tower in open_clip keys: the frozen clip_vision folder's weights
    enc = load_file(str(folder / "encoder.safetensors"))
    assert "clip_vision.transformer.resblocks.2.attn.in_proj_weight" in enc and "clip_vision.proj" not in enc
    ref_tower = host.transformers_to_open_clip(CLIPVisionModel.from_pretrained(str(tiny_run / "clip")).state_dict())
    assert set(w.clip_vision) == set(ref_tower) and all(torch.equal(w.clip_vision[k], ref_tower[k]) for k in ref_tower)

    # both processes hold the same weights (gradients averaged) after drawing different batches
    (s0, i0), (s1, i1) = (export.load_state(str(out / f"faces.rank{r}.state.safetensors")) for r in (0, 1))
    assert i0["step"] == i1["step"] == 2 and i0["config"]["mode"] == "pretrain"
    for k in s0:
        if k.startswith(("head.", "offsets.")):
            assert torch.equal(s0[k], s1[k]), k
    assert not torch.equal(s0["rng.trainer"], s1["rng.trainer"])
    assert not any(k.startswith("unet.") for k in s0)  # the UNet is frozen: not in the state
    losses = json.loads((out / "faces.losses.json").read_text())
    assert set(losses) == {"diffusion", "reg", "total"} and len(losses["total"]) == 2



def test_pretrain_continues_from_an_e4t_folder_and_resumes(tiny_run, tmp_path, capsys):
    """In-process, one process: ``init`` gives the head, offsets and CLIP tower of an E4T folder (the class word comes
    from its config; clip_vision only gives the tower's architecture, as a 40-wide tower's heads cannot be derived);
    a resume continues the step count and the loss history."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPVisionModel

    from comfyui_personalize.training import export

    unet = UNet2DConditionModel.from_pretrained(str(tiny_run / "sd"), subfolder="unet")
    torch.manual_seed(9)
    head = e4t.E4THead(host.feature_channels(unet), 40, 129, CROSS)
    offsets = e4t.OffsetSet(host.offset_shapes(unet), seed=9)
    tower = host.transformers_to_open_clip(tiny_vision(seed=2).state_dict())
    init = tmp_path / "init"
    e4t.save_e4t(str(init), {"domain_class_token": "face", "placeholder_token": "*s", "resolution": 32,
                             "unfreeze_clip_vision": True}, head, offsets, tower)
    out = tmp_path / "out"
    path = tmp_path / "run.json"
    cfg = run_config(tiny_run, out, init=str(init), class_word=None, prompt_template="a photo of {placeholder_token}")
    cfg["train"] = {"steps": 1, "batch_size": 2, "learning_rate": 1e-3}
    path.write_text(json.dumps(cfg))
    result = e4t_pretrain.main(["--config", str(path)])
    assert result["steps"] == 1 and capsys.readouterr().out.strip() == str(out / "faces")
    w = e4t.load_e4t(str(out / "faces"))
    assert w.config.domain_class_token == "face" and w.config.prompt_template == "a photo of {placeholder_token}"
    # the tower is init's, which was trained there: not the standard file
    assert w.config.unfreeze_clip_vision and w.config.raw["clip_model_name_or_path"] == str(init)
    assert all(torch.equal(w.clip_vision[k], tower[k]) for k in tower)  # init's tower, not the clip_vision folder's
    assert not torch.equal(CLIPVisionModel.from_pretrained(str(tiny_run / "clip")).state_dict()["post_layernorm.weight"],
                           host.open_clip_to_transformers(tower, "")["post_layernorm.weight"])
    d = w.head.state_dict()
    steps = {k: float((d[k] - v).abs().max()) for k, v in head.state_dict().items()}
    assert 0 < max(steps.values()) < 0.01  # one AdamW step (lr 1e-3) from init, not from a fresh head
    losses = json.loads((out / "faces.losses.json").read_text())

    cfg["resume"] = str(out / "faces.state.safetensors")
    path.write_text(json.dumps(cfg))
    assert e4t_pretrain.main(["--config", str(path), "--steps", "3"])["steps"] == 3
    assert export.load_state(str(out / "faces.state.safetensors"))[1]["step"] == 3
    losses3 = json.loads((out / "faces.losses.json").read_text())
    assert losses3["total"][:1] == losses["total"] and len(losses3["total"]) == 3
    assert json.loads((out / "faces" / "config.json").read_text())["personalize_steps_done"] == 3


@pytest.mark.parametrize("change, message", [
    ({"typo": 1}, "unknown key"),
    ({"clip_vision": None}, "give 'clip_vision'"),
    ({"train": {"templates": ["{placeholder_token}"]}}, "set the top-level 'prompt_template' instead"),
    ({"checkpoint_every": -1}, "checkpoint_every must be a whole number"),
    ({"name": "../x"}, "must be a plain folder name"),
])
def test_bad_configs_are_refused_before_loading(tiny_run, tmp_path, change, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**run_config(tiny_run, tmp_path), **change}))
    with pytest.raises(SystemExit, match=message):
        e4t_pretrain.load_run(str(path))


@pytest.mark.parametrize("change, message", [
    ({"class_word": None}, "'class_word' is required"),
    ({"prompt_template": "a photo"}, "has no {placeholder_token}"),
    ({"placeholder_token": "two words"}, "placeholder_token must be one word"),
])
def test_bad_settings_are_refused(tiny_run, tmp_path, change, message):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**run_config(tiny_run, tmp_path), **change}))
    with pytest.raises(SystemExit, match=message):
        e4t_pretrain.settings(e4t_pretrain.load_run(str(path)), None, str(path))


def test_a_head_for_other_models_is_refused(tiny_run):
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(str(tiny_run / "clip"))
    head = e4t.E4THead(10880, 40, 129, 768)
    with pytest.raises(SystemExit, match=r"UNet feature channels 10880 \(this model: 112\).*word width 768 \(this model: 16\)"):
        e4t_pretrain.check_head(head, 112, vision, CROSS, "mkshing")


def test_a_multi_token_class_word_is_refused(tiny_run, tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run_config(tiny_run, tmp_path / "out", class_word="dusk")))
    with pytest.raises(SystemExit, match="the class word 'dusk' is 4 tokens"):
        e4t_pretrain.main(["--config", str(path)])
    assert not (tmp_path / "out").exists()


def test_domain_images_augment_like_the_reference(tiny_run):
    """Crops are resolution squares of the image resized on its short side with pixel-area averaging (cv2.INTER_AREA,
    the reference's albumentations flag 3), flipped about half the time; each epoch visits every image once; at one
    step the processes take different images."""
    files = e4t_pretrain.domain_files(str(tiny_run / "faces"))
    assert len(files) == N_FACES
    imgs = e4t_pretrain.DomainImages(files, 24, seed=1)
    g = torch.Generator().manual_seed(0)
    px = imgs.pixels(0, 8, g)
    assert px.shape == (8, 3, 24, 24) and float(px.min()) >= -1 and float(px.max()) <= 1
    assert sorted(imgs.indices(0, N_FACES)) == list(range(N_FACES))  # one epoch: a permutation
    r0 = e4t_pretrain.DomainImages(files, 24, seed=1, rank=0, world=2).indices(0, 3)
    r1 = e4t_pretrain.DomainImages(files, 24, seed=1, rank=1, world=2).indices(0, 3)
    assert sorted(r0 + r1) == list(range(N_FACES))
    # resize: 48 x 40 -> 28.8 x 24 with the area filter (cv2.INTER_AREA on an integer factor: 2x down)
    cv2 = pytest.importorskip("cv2", reason="OpenCV is the reference of the area resize")
    arr = np.asarray(Image.open(files[0]).convert("RGB"))
    big = np.repeat(np.repeat(arr, 2, 0), 2, 1)[:, :, ::-1].copy()
    ref = cv2.resize(big, (40, 48), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    ours = np.asarray(Image.fromarray(big[:, :, ::-1]).resize((40, 48), getattr(Image, e4t_pretrain.RESIZE_FILTER)))
    assert int(np.abs(ours.astype(int) - ref.astype(int)).max()) <= 1
    # crops and flips: at resolution 40 the 40 x 48 faces are not resized; a crop is rows top..top+40 (top 0..8),
    # mirrored or not
    whole = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1
    crops = [whole[:, top:top + 40] for top in range(9)]
    g = torch.Generator().manual_seed(3)
    seen = set()
    for _ in range(24):
        x = e4t_pretrain.DomainImages(files, 40, seed=1).augment(files[0], g)
        hits = [(top, flip) for top, c in enumerate(crops) for flip in (False, True)
                if torch.equal(x, c.flip(-1) if flip else c)]
        assert len(hits) >= 1
        seen |= set(hits)
    assert {f for _, f in seen} == {False, True} and len({t for t, _ in seen}) > 3
