"""Sampling step time with and without IP-Adapter (base and Plus) on a full-size SD1.5 UNet with random weights.

    COMFYUI_PATH=/path/to/ComfyUI python bench/ipadapter_step.py [--steps 3] [--size 512] [--device cpu|cuda]

Runs the real ComfyUI sampler (KSampler, euler, CFG batch of cond + uncond) on the same model, unpatched and patched
with full-size adapters in the official layouts (ip-adapter_sd15: 4 tokens; ip-adapter-plus_sd15: 16 tokens), and
prints the ratio of the mean step time to the unpatched one. Targets: base <= 1.05x, Plus <= 1.10x.
Timings interleave the variants round by round so machine noise hits them alike.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "devtools"))

# Full-size SD1.5 (comfy.supported_models.SD15 / model_detection): the UNet the official adapters were made for.
SD15_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
             "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
             "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
             "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
             "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
             "use_temporal_attention": False, "use_temporal_resblock": False}
SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]  # checkpoint order
VIT_H_EMBEDS, VIT_H_HIDDEN = 1024, 1280


def fill_random_(module, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place: matrices N(0, std), norm scales 1, biases 0."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)


def paired_rounds(variants: dict, run, rounds: int) -> dict[str, list[float]]:
    """``run(name, model)`` once per variant to warm up (first load, allocator, kernels), then interleaved round by
    round, so that the machine's drift hits every variant alike: ``{name: [seconds per round]}``."""
    for name, m in variants.items():
        run(name, m)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, m in variants.items():
            times[name].append(run(name, m))
    return times


def print_ratios(times: dict[str, list[float]], base: str, notes: dict | None = None) -> None:
    """One line per variant: the median time and its ratio to ``base``'s median."""
    ref = statistics.median(times[base])
    width = max(len(k) for k in times)
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:>{width}}: {med:8.3f} s/step  ratio {med / ref:5.3f}x{(notes or {}).get(name, '')}  "
              f"(runs: {', '.join(f'{t:.3f}' for t in ts)})")


def build_model(device):
    import comfy.model_detection
    import comfy.model_patcher
    import torch

    config = comfy.model_detection.model_config_from_unet_config(dict(SD15_UNET))
    config.set_inference_dtype(torch.float16 if device.type == "cuda" else torch.float32, None)
    model = config.get_model({}, device=device)
    fill_random_(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def write_adapters(folder):
    import tiny_adapters

    paths = {}
    for family, clip_dim in (("base", VIT_H_EMBEDS), ("plus", VIT_H_HIDDEN)):
        sd = tiny_adapters.adapter_state_dict(family, SD15_WIDTHS, 768, clip_dim, seed=1)
        if family == "plus":  # the public Plus Resampler: dim 768, 12 heads (tiny_adapters uses a small dim)
            sd["image_proj"] = full_plus_proj(clip_dim)
        paths[family] = tiny_adapters.save_adapter(sd, os.path.join(folder, f"bench_{family}.safetensors"))
    return paths


def full_plus_proj(clip_dim, dim=768, depth=4, queries=16):
    import torch

    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g) / s[-1] ** 0.5  # noqa: E731
    sd = {"latents": r(1, queries, dim), "proj_in.weight": r(dim, clip_dim), "proj_in.bias": torch.zeros(dim),
          "proj_out.weight": r(768, dim), "proj_out.bias": torch.zeros(768), "norm_out.weight": torch.ones(768),
          "norm_out.bias": torch.zeros(768)}
    for i in range(depth):
        for n in ("norm1", "norm2"):
            sd[f"layers.{i}.0.{n}.weight"], sd[f"layers.{i}.0.{n}.bias"] = torch.ones(dim), torch.zeros(dim)
        sd.update({f"layers.{i}.0.to_q.weight": r(dim, dim), f"layers.{i}.0.to_kv.weight": r(2 * dim, dim),
                   f"layers.{i}.0.to_out.weight": r(dim, dim), f"layers.{i}.1.0.weight": torch.ones(dim),
                   f"layers.{i}.1.0.bias": torch.zeros(dim), f"layers.{i}.1.1.weight": r(4 * dim, dim),
                   f"layers.{i}.1.3.weight": r(dim, 4 * dim)})
    return sd


def main(argv=None):
    ap = argparse.ArgumentParser(description="IP-Adapter step-time ratios (full-size SD1.5, random weights)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui or COMFYUI_PATH is required")
    import comfy_host

    comfy_host.bootstrap(args.comfyui, load_extras=False)
    if args.device != "cpu":
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = False
    import comfy.utils
    import nodes
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    folder = tempfile.mkdtemp(prefix="personalize_bench_")
    os.makedirs(os.path.join(folder, "ipadapter"))
    paths = write_adapters(os.path.join(folder, "ipadapter"))
    comfy_host.use_models_dir(folder)
    maps = comfy_host.load_pack(ROOT)
    ipa_mod = sys.modules[next(k for k in sys.modules if k.endswith("ComfyUI-Personalize.models.ipadapter"))]

    device = torch.device(args.device)
    model = build_model(device)
    variants = {"none": model}
    for family, path in paths.items():
        ipa = maps["PersonalizeIPAdapterLoader"]().load(os.path.basename(path))[0]
        shape = (1, VIT_H_EMBEDS) if family == "base" else (1, 257, VIT_H_HIDDEN)
        embeds = ipa_mod.IPAEmbeds(torch.randn(shape), torch.zeros(shape), ipa.spec.feature)
        variants[family] = maps["PersonalizeIPAdapterApply"]().apply(model, ipa, 0.8, "linear", 0.0, 1.0, "concat", "V only",
                                                                     embeds=embeds)[0]

    cond = [[torch.randn(1, 77, 768), {}]]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    sampler = nodes.KSampler()

    def run(m, steps):
        t0 = time.perf_counter()
        with torch.inference_mode():
            sampler.sample(m, 0, steps, 7.0, "euler", "normal", cond, cond, latent)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    for m in variants.values():  # warm-up (first load, allocator, kernels)
        run(m, 1)
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, m in variants.items():
            times[k].append(run(m, args.steps))
    base = statistics.median(times["none"])
    print(f"SD1.5 UNet, {args.size}x{args.size}, CFG batch 2, {args.steps} steps x {args.rounds} rounds, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:>5}: {med:8.3f} s/step  ratio {med / base:5.3f}x  (runs: {', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
