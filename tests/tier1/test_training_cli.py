"""Tier 1: the command line trains a tiny diffusers model folder (save_pretrained layout) for 2 steps, as a script
(``python training/cli.py --config ...``), writes the LoRA in ComfyUI's key format, the embedding and a state that
resumes; launched as 2 CPU processes (``accelerate launch``, gloo) the processes' gradients are averaged."""
import json
import os
import subprocess
import sys
import threading

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
def tiny_model(tmp_path_factory, tiny_unet):
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny_sd")
    tiny_unet(cross_attention_dim=CROSS).save_pretrained(root / "unet")
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


def run_config(tiny_model, out):
    return {"model": str(tiny_model), "images": str(tiny_model / "images"), "output_dir": str(out), "name": "subj",
            "resolution": 32, "prior_count": 2,
            "train": {"steps": 2, "rank": 2, "token": "zq", "class_word": "dog", "train_token": True,
                      "sude_weight": 0.4, "palp_weight": 1.0, "palp_prompts": ["a sketch of a dog"],
                      "prior_weight": 1.0}}


def test_cli_trains_two_steps_and_resumes(tiny_model, tmp_path):
    out = tmp_path / "out"
    cfg = run_config(tiny_model, out)
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


def launch_two_processes(config_path, home, *extra):
    """``accelerate launch --multi_gpu --num_processes 2`` (torchrun underneath) with the GPUs hidden: the CLI runs the
    processes on the CPU (gloo). Hermetic: no accelerate config file (HF_HOME is a fresh folder), no ACCELERATE_*
    variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH="", HF_HOME=str(home), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           os.path.join(ROOT, "training", "cli.py"), "--config", str(config_path), "-v", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def averaged_gradient_reference(run, snapshots):
    """The 2-process run computed in this process: two Trainers built as the CLI builds them (same model, images,
    LoRA init and class-image cache; seeds s and s + 1, as ranks 0 and 1), each in its own thread, stepping together;
    their ``grad_sync`` hook replaces both gradients by (g0 + g1) / 2, the sum-then-divide accelerate's
    ``reduce(grad, "mean")`` does (a sum of two floats is exact in either order, so the result is bit-exact).
    Returns each trainer's state tensors and loss history after each step count in ``snapshots``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from comfyui_personalize.training import cli
    from comfyui_personalize.training.diffusers_host import ClipTextEncoder, DiffusersDenoiser, unet_lora
    from comfyui_personalize.training.trainer import TrainConfig, Trainer

    model, config = run["model"], TrainConfig.from_dict(run["train"])

    def trainer(rank):
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
        text = ClipTextEncoder(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer"),
                               CLIPTextModel.from_pretrained(model, subfolder="text_encoder"), config.token)
        token_init = text.word_embedding(config.class_word)
        denoiser = DiffusersDenoiser.from_scheduler(unet, DDPMScheduler.from_pretrained(model, subfolder="scheduler"))
        lora = unet_lora(unet, config.targets, config.rank, config.alpha, config.seed)
        latents = cli.encode_latents(vae, cli.load_pixels(cli.image_files(run["images"]), run["resolution"]))
        prior = cli.prior_latents(run, config, denoiser, text, vae, lora, latents.shape[1:], "cpu")  # the run's cache
        proc_config = TrainConfig.from_dict({**config.to_dict(), "seed": config.seed + rank})
        return Trainer(denoiser, lora, text, latents, proc_config, prior_latents=prior, token_init=token_init,
                       device="cpu")

    trainers = [trainer(0), trainer(1)]
    barrier = threading.Barrier(2, timeout=300)
    grads = [None, None]

    def averaging(rank):
        def sync(params):
            params = [p for p in params if p.grad is not None]
            grads[rank] = [p.grad.clone() for p in params]
            barrier.wait()
            mean = [(a + b) / 2 for a, b in zip(*grads)]
            barrier.wait()
            for p, g in zip(params, mean):
                p.grad.copy_(g)
        return sync

    errors = []

    def train(t, until):
        try:
            t.train(until)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            barrier.abort()

    for rank, t in enumerate(trainers):
        t.grad_sync = averaging(rank)
    out = {}
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes (OMP_NUM_THREADS=1): same kernels, same rounding
    try:
        for until in snapshots:
            workers = [threading.Thread(target=train, args=(t, until)) for t in trainers]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            if errors:
                raise errors[0]
            out[until] = [({k: v.clone() for k, v in t.state_tensors()[0].items()}, list(t.history)) for t in trainers]
    finally:
        torch.set_num_threads(threads_before)
    return out


def assert_same_tensors(a, b, what, skip=("rng.torch",)):
    assert sorted(a) == sorted(b), what
    diff = [k for k in a if k not in skip and not torch.equal(a[k], b[k])]
    worst = max((float((a[k].double() - b[k].double()).abs().max()) for k in diff), default=0.0)
    assert not diff, f"{what}: {len(diff)} tensors differ (at most by {worst:.3g}), e.g. {diff[:3]}"


def test_cli_two_processes_average_gradients_and_resume(tiny_model, tmp_path):
    """2 CPU processes (accelerate launch, gloo) train 2 steps: both processes end with bit-identical LoRA, token and
    optimizer states, different batch generators (seed + rank), and equal to :func:`averaged_gradient_reference`
    (which a run whose gradients were not averaged, or averaged differently, does not match); resumed with
    2 processes for a third step, they are equal to the reference's third step."""
    pytest.importorskip("accelerate", reason="multi-process training runs through accelerate (pip install accelerate)")
    from comfyui_personalize.training import cli, export

    out = tmp_path / "out"
    cfg = run_config(tiny_model, out)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    r = launch_two_processes(path, tmp_path / "hf")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "process 1 of 2 (DistributedType.MULTI_CPU" in r.stderr, r.stderr[-3000:]
    assert sum(f.startswith("prior_") for f in os.listdir(out)) == 1  # rank 0 generated the class images once
    states = [export.load_state(str(out / f"subj.rank{rank}.state.safetensors")) for rank in (0, 1)]
    (s0, info0), (s1, info1) = states
    assert info0["step"] == info1["step"] == 2
    assert_same_tensors(s0, s1, "rank 0 vs rank 1", skip=("rng.torch", "rng.trainer"))
    assert not torch.equal(s0["rng.trainer"], s1["rng.trainer"])  # the ranks drew different batches
    assert any(k.startswith("optim.") for k in s0) and "token" in s0

    cfg["resume"] = str(out / "subj.state.safetensors")  # each process resumes its own subj.rank<r>.state.safetensors
    path.write_text(json.dumps(cfg))
    r = launch_two_processes(path, tmp_path / "hf", "--steps", "3")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    resumed = [export.load_state(str(out / f"subj.rank{rank}.state.safetensors")) for rank in (0, 1)]
    losses = json.loads((out / "subj.losses.json").read_text())

    ref = averaged_gradient_reference({**cli.RUN_DEFAULTS, **cfg}, (2, 3))
    for rank in (0, 1):
        assert_same_tensors(states[rank][0], ref[2][rank][0], f"rank {rank} after 2 steps vs reference")
        assert resumed[rank][1]["step"] == 3
        assert_same_tensors(resumed[rank][0], ref[3][rank][0], f"rank {rank} resumed to step 3 vs reference")
    ref_losses = {k: [h[k] for h in ref[3][0][1]] for k in ref[3][0][1][0]}
    assert losses == ref_losses  # rank 0's losses (its own batches)
