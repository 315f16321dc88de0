"""Flux step time with PuLID-FLUX and with the XLabs IP-Adapter against a bare step, on a full-width random-weight Flux
transformer (hidden 3072, 24 heads, text 4096: Flux.1-dev's widths), through ComfyUI's KSampler and the pack's nodes.

    COMFYUI_PATH=/path/to/ComfyUI python bench/flux_step.py [--size 512] [--double 2 --single 4] [--rounds 2]
    (GPU: --device cuda --dtype bf16 --size 1024 --double 19 --single 38)

- The transformer is ComfyUI's Flux class at full width. On a CPU machine the whole Flux.1-dev (12 B parameters) does
  not fit in memory, so the default is 2 double + 4 single blocks: PuLID-FLUX puts one cross-attention after every 2nd
  double and every 4th single block and XLabs one term after every double block, so the share of blocks that carry a
  patch, per kind, is the same as on the 19 + 38 blocks of Flux.1-dev, and the ratios carry over (the embedding and
  final layers, a few per cent of a step, dilute them slightly less than on the full model).
- One sampling step at cfg 1 (one conditional pass: Flux.1-dev's distilled guidance, PuLID-FLUX's official default),
  text 256 tokens (ComfyUI's T5 default). Variants interleave round by round; the ratio is the median of the rounds.
- PuLID-FLUX: the IDFormer (v1.1 defaults) and a cross-attention per patched block, 16 heads of 128 from 3072 to the
  32 ID tokens of 2048. XLabs: 16 tokens of 4096 (v2), K / V 4096 -> 3072 per double block.
Target (issue 13): <= 1.05x for PuLID-FLUX. Random weights: the numbers are costs, not pictures.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "devtools"))
sys.path.insert(0, HERE)

# Flux.1-dev as comfy/model_detection.py reads it from flux1-dev.safetensors (depths set by the arguments).
FLUX_DEV = {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
            "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "axes_dim": [16, 56, 56],
            "theta": 10000, "qkv_bias": True, "guidance_embed": True}
TEXT_TOKENS = 256  # comfy/text_encoders/flux.py T5XXLTokenizer min_length
XLABS_TOKENS = 16  # flux-ip-adapter-v2
CLIP_L_EMBEDS = 768


def write_pulid_flux(path, depths):
    import torch
    from pulid_step import IDFORMER, randomize
    from safetensors.torch import save_file

    from comfyui_personalize.models import pulid
    from comfyui_personalize.models.dit import interval_sites

    sd = {f"pulid_encoder.{k}": v.contiguous() for k, v in randomize(pulid.IDFormer(**IDFORMER), 1).state_dict().items()}
    for k in range(len(interval_sites(depths, pulid.PULID_FLUX_INTERVALS))):
        ca = randomize(pulid.PerceiverAttentionCA(3072, 2048, 16), 10 + k)
        sd.update({f"pulid_ca.{k}.{n}": v.contiguous() for n, v in ca.state_dict().items()})
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)


def write_xlabs(path, double):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    sd = {"ip_adapter_proj_model.proj.weight": torch.randn(XLABS_TOKENS * 4096, CLIP_L_EMBEDS, generator=g) * 0.02,
          "ip_adapter_proj_model.proj.bias": torch.zeros(XLABS_TOKENS * 4096),
          "ip_adapter_proj_model.norm.weight": torch.ones(4096), "ip_adapter_proj_model.norm.bias": torch.zeros(4096)}
    for i in range(double):
        for name in ("ip_adapter_double_stream_k_proj", "ip_adapter_double_stream_v_proj"):
            sd[f"double_blocks.{i}.processor.{name}.weight"] = torch.randn(3072, 4096, generator=g) * 0.02
            sd[f"double_blocks.{i}.processor.{name}.bias"] = torch.zeros(3072)
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Flux step-time ratios with PuLID-FLUX and XLabs (full width, random weights)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui or COMFYUI_PATH is required")
    import comfy_host

    comfy_host.bootstrap(args.comfyui, load_extras=False)
    if args.device != "cpu":
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = False
    import pack_alias

    pack_alias.register()
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.utils
    import nodes
    import torch
    from ipadapter_step import fill_random_, paired_rounds, print_ratios

    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    depths = (args.double, args.single)
    folder = tempfile.mkdtemp(prefix="personalize_bench_flux_")
    for sub in ("pulid", "ipadapter"):
        os.makedirs(os.path.join(folder, sub))
    write_pulid_flux(os.path.join(folder, "pulid", "bench_pulid_flux.safetensors"), depths)
    write_xlabs(os.path.join(folder, "ipadapter", "bench_flux_ip_adapter_v2.safetensors"), args.double)
    comfy_host.use_models_dir(folder, folder_names=("pulid", "ipadapter"))
    maps = comfy_host.load_pack(ROOT)
    mods = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: v for k, v in sys.modules.items() if "ComfyUI-Personalize.models." in k}

    config = comfy.model_detection.model_config_from_unet_config(dict(FLUX_DEV, depth=args.double, depth_single_blocks=args.single))
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, device=device)
    fill_random_(base.diffusion_model, 0)
    model = comfy.model_patcher.ModelPatcher(base, load_device=device, offload_device=torch.device("cpu"))
    g = torch.Generator().manual_seed(7)
    embeds = mods["models.pulid"].PuLIDEmbeds(torch.randn(1, 1280, generator=g), [torch.randn(1, 577, 1024, generator=g)
                                                                                  for _ in range(5)])
    ipa_embeds = mods["models.ipadapter"].IPAEmbeds(torch.randn(1, CLIP_L_EMBEDS, generator=g), torch.zeros(1, CLIP_L_EMBEDS),
                                                    "image_embeds")
    with torch.inference_mode():
        pulid = maps["PersonalizePuLIDLoader"]().load("bench_pulid_flux.safetensors")[0]
        xlabs = maps["PersonalizeIPAdapterLoader"]().load("bench_flux_ip_adapter_v2.safetensors")[0]
        variants = {"bare": model,
                    "pulid-flux": maps["PersonalizePuLIDFluxApply"]().apply(model, pulid, embeds, 1.0, 0, 0.0, 1.0,
                                                                           "first (official)")[0],
                    "xlabs v2": maps["PersonalizeIPAdapterFluxApply"]().apply(model, xlabs, 1.0, 0.0, 1.0, "concat",
                                                                             embeds=ipa_embeds)[0]}
    cond = [[torch.randn(1, TEXT_TOKENS, 4096, generator=g) * 0.5, {"pooled_output": torch.randn(1, 768, generator=g),
                                                                     "guidance": 3.5}]]
    latent = {"samples": torch.zeros(1, 16, args.size // 8, args.size // 8)}
    sampler = nodes.KSampler()
    peaks = {}

    def run(name, m):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            sampler.sample(m, 0, 1, 1.0, "euler", "simple", cond, cond, latent)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2 ** 30
        return time.perf_counter() - t0

    times = paired_rounds(variants, run, args.rounds)
    print(f"Flux (width 3072, {args.double} double + {args.single} single blocks), {args.size}x{args.size} "
          f"({(args.size // 16) ** 2} image + {TEXT_TOKENS} text tokens), cfg 1, {args.dtype}, device {device}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds} rounds")
    print_ratios(times, "bare", {k: f"  peak {v:.2f} GiB" for k, v in peaks.items()})


if __name__ == "__main__":
    main()
