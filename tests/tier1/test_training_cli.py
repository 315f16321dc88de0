"""Tier 1: the command line trains a tiny diffusers model folder (save_pretrained layout) for 2 steps, as a script
(``python training/cli.py --config ...``), writes the LoRA in ComfyUI's key format, the embedding and a state that
resumes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CROSS = 16


def write_tokenizer(folder):
    """A character-level CLIP BPE tokenizer (no merges): enough to tokenize prompts offline."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-_")
    vocab = {w: i for i, w in enumerate(["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars])}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=16)
    tok.save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS,
                         attention_head_dim=4, norm_num_groups=8).save_pretrained(root / "unet")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(root / "vae")
    n_vocab = write_tokenizer(str(root / "tokenizer"))
    CLIPTextModel(CLIPTextConfig(vocab_size=n_vocab, hidden_size=CROSS, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(root / "text_encoder")
    DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").save_pretrained(root / "scheduler")
    images = root / "images"
    images.mkdir()
    for i in range(2):
        arr = (np.random.default_rng(i).uniform(0, 255, (40, 48, 3))).astype("uint8")
        Image.fromarray(arr).save(images / f"{i}.png")
    return root


def run_cli(config_path, *extra):
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run([sys.executable, os.path.join(ROOT, "training", "cli.py"), "--config", str(config_path), *extra],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_trains_two_steps_and_resumes(tiny_model, tmp_path):
    out = tmp_path / "out"
    cfg = {"model": str(tiny_model), "images": str(tiny_model / "images"), "output_dir": str(out), "name": "subj",
           "resolution": 32, "prior_count": 2,
           "train": {"steps": 2, "rank": 2, "token": "zq", "class_word": "dog", "train_token": True, "sude_weight": 0.4,
                     "palp_weight": 1.0, "palp_prompts": ["a sketch of a dog"], "prior_weight": 1.0}}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    r = run_cli(path)
    assert r.returncode == 0, r.stderr[-3000:]
    from safetensors.torch import load_file

    lora = load_file(str(out / "subj.safetensors"))
    assert lora and all(k.startswith(("diffusion_model.input_blocks.", "diffusion_model.middle_block.1.",
                                       "diffusion_model.output_blocks.")) for k in lora)
    assert any(k.endswith("attn2.to_k.lora_up.weight") for k in lora)
    emb = load_file(str(out / "subj.embedding.safetensors"))["emb_params"]
    assert emb.shape == (1, CROSS)
    losses = json.loads((out / "subj.losses.json").read_text())
    assert set(losses) == {"reconstruction", "prior", "sude", "palp", "total"} and len(losses["total"]) == 2
    assert any(f.startswith("prior_") for f in os.listdir(out))  # class images generated once, cached

    cfg["resume"] = str(out / "subj.state.safetensors")
    path.write_text(json.dumps(cfg))
    r = run_cli(path, "--steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    losses2 = json.loads((out / "subj.losses.json").read_text())
    assert losses2["total"][:2] == losses["total"] and len(losses2["total"]) == 3


def test_cli_reports_a_bad_config(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": "x", "images": "y", "typo": 1}))
    r = run_cli(path)
    assert r.returncode != 0 and "unknown key" in r.stderr
