"""Training step time of the SuDe and PALP terms relative to a plain LoRA step, on a full-size SD1.5 UNet with random
weights (diffusers UNet2DConditionModel, SD1.5 config), with and without DreamBooth prior preservation, and with the
token [V] trained too (a full-size SD1.5 text encoder, random weights, runs forward and backward at every step).

    python bench/train_step.py [--size 256] [--steps 2] [--rounds 2] [--device cpu|cuda] [--precision no|fp16|bf16]

Floors from the forward counts: a plain step is one forward + backward (~3 forward units); SuDe adds one
batched no-grad forward of two (~1.7x); PALP adds two of two (~2.3x); SuDe + PALP share the LoRA-on forward.
With prior preservation the grad forward is a batch of two and the ratios are taken against plain + prior.
Timings interleave the variants round by round so machine noise hits them alike. On CUDA the peak memory is printed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "devtools"))

# SD1.5 text encoder (openai/clip-vit-large-patch14 text config): 123M parameters.
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                 max_position_embeddings=77, hidden_act="quick_gelu")
TOKEN_POSITION = 4  # "<start> a photo of [V] dog ...": where the trained vector sits in the sequence
# SD1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json): 860M parameters.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
VARIANTS = {
    "plain": {},
    "sude": {"sude_weight": 0.4},
    "palp": {"palp_weight": 1.0},
    "sude+palp": {"sude_weight": 0.4, "palp_weight": 1.0},
}
TOKEN_VARIANTS = ("plain", "sude+palp")  # also timed with train_token (without prior preservation)


def main(argv=None):
    ap = argparse.ArgumentParser(description="SuDe / PALP training step-time ratios (full-size SD1.5, random weights)")
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)

    import pack_alias

    pack_alias.register()
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfyui_personalize.training.diffusers_host import DiffusersDenoiser, unet_lora
    from comfyui_personalize.training.schedule import NoiseSchedule, scaled_linear_alphas_cumprod
    from comfyui_personalize.training.trainer import TrainConfig, Trainer

    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).to(device)
    den = DiffusersDenoiser(unet, NoiseSchedule(scaled_linear_alphas_cumprod(), "eps"))
    lora = unet_lora(unet, TrainConfig().targets, args.rank, None, 0).to(device)
    text = CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).to(device).requires_grad_(False)
    table = text.get_input_embeddings()
    ids = torch.arange(1, 78)[None].to(device)  # any fixed prompt; the cost does not depend on the ids
    contexts = {}
    current = {}

    def with_token(module, inputs, output):  # the trainable vector replaces the placeholder's input embedding
        if current.get("token") is None:
            return output
        return torch.cat([output[:, :TOKEN_POSITION], current["token"][None].to(output), output[:, TOKEN_POSITION + 1:]], 1)

    table.register_forward_hook(with_token)

    def encode(prompts, token):
        if token is not None:
            current["token"] = token
            try:
                return torch.cat([text(input_ids=ids).last_hidden_state for _ in prompts])
            finally:
                current["token"] = None
        for p in prompts:
            contexts.setdefault(p, torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(len(contexts))))
        return torch.cat([contexts[p] for p in prompts]).to(device)

    lat = args.size // 8
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, lat, lat, generator=g).to(device)
    prior = torch.randn(4, 4, lat, lat, generator=g).to(device)
    trainers = {}
    for with_prior in (False, True):
        for name, terms in VARIANTS.items():
            cfg = TrainConfig(steps=10 ** 6, rank=args.rank, palp_prompts=["a sketch of a dog"], mixed_precision=args.precision,
                              prior_weight=1.0 if with_prior else 0.0, **terms)
            trainers[name + ("+prior" if with_prior else "")] = Trainer(den, lora, encode, latents, cfg,
                                                                       prior_latents=prior, device=device)
    for name in TOKEN_VARIANTS:
        cfg = TrainConfig(steps=10 ** 6, rank=args.rank, palp_prompts=["a sketch of a dog"], mixed_precision=args.precision,
                          train_token=True, **VARIANTS[name])
        trainers[name + "+token"] = Trainer(den, lora, encode, latents, cfg, device=device,
                                            token_init=table.weight[:1].detach().clone())

    def run(tr, steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            tr.train_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    peaks = {}
    for k, tr in trainers.items():  # warm-up (allocator, kernels)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        run(tr, 1)
        if device.type == "cuda":
            peaks[k] = torch.cuda.max_memory_allocated() / 2 ** 30
    times = {k: [] for k in trainers}
    for _ in range(args.rounds):
        for k, tr in trainers.items():
            times[k].append(run(tr, args.steps))
    print(f"SD1.5 UNet (random weights), {args.size}x{args.size}, batch 1, LoRA rank {args.rank} on attention q/k/v/out, "
          f"{args.steps} steps x {args.rounds} rounds, device {device}, precision {args.precision}, "
          f"torch threads {torch.get_num_threads()}")
    for k, ts in times.items():
        base = statistics.median(times["plain+prior" if k.endswith("+prior") else "plain"])  # +token: vs plain
        med = statistics.median(ts)
        peak = f"  peak {peaks[k]:.2f} GiB" if k in peaks else ""
        print(f"{k:>17}: {med:8.3f} s/step  ratio {med / base:5.2f}x{peak}  (runs: {', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
