"""IP-Adapter batches: the step time of a 16-frame unfold batch with 16 references against one reference (ratio), and
the peak memory of encoding 64 references with and without an encode batch size, on full-size random-weight models
(SD1.5 UNet, ViT-H/14 CLIP vision, the base ip-adapter_sd15 layout) through the pack's nodes.

    COMFYUI_PATH=/path/to/ComfyUI python bench/ipadapter_batch.py [--size 256] [--frames 16] [--rounds 2]
                                                                   [--encode-only | --unfold-only] [--references 64]

The encode figure is the process's peak RSS growth while encoding (CPU), or the CUDA peak, measured in a fresh process
per setting so that one does not inherit the other's high-water mark. Random weights: costs, not pictures.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "devtools"))
sys.path.insert(0, HERE)

def clip_vision_h(seed: int = 1):
    """ComfyUI's CLIP ViT-H/14 vision model (its own clip_vision_config_h.json), random weights."""
    import comfy.clip_vision
    from ipadapter_step import fill_random_

    cv = comfy.clip_vision.ClipVisionModel(os.path.join(os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json"))
    fill_random_(cv.model, seed)
    return cv


def encode_peak(args) -> None:
    """Child process: encode ``--references`` images once; print the peak memory growth as JSON."""
    import comfy_host

    comfy_host.bootstrap(args.comfyui, load_extras=False)
    import pack_alias
    import torch

    pack_alias.register()
    cv = clip_vision_h()
    device = torch.device(args.device)
    maps = comfy_host.load_pack(ROOT)
    vision = sys.modules[next(k for k in sys.modules if k.endswith("ComfyUI-Personalize.nodes.comfy.vision"))]
    images = torch.rand(args.references, 224, 224, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        vision.encode_clip_vision(cv, images[:1], "image_embeds")  # load the weights first
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        vision.encode_clip_vision(cv, images, "image_embeds", args.encode_batch_size)
        seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 20)
    del maps
    print(json.dumps({"peak_gib": peak, "seconds": seconds}))


def bench_unfold(args, device) -> None:
    import comfy.utils
    import comfy_host
    import nodes
    import torch
    from ipadapter_step import build_model, paired_rounds, print_ratios, write_adapters

    comfy.utils.PROGRESS_BAR_ENABLED = False
    folder = tempfile.mkdtemp(prefix="personalize_bench_ipa_")
    os.makedirs(os.path.join(folder, "ipadapter"))
    write_adapters(os.path.join(folder, "ipadapter"))
    comfy_host.use_models_dir(folder)
    maps = comfy_host.load_pack(ROOT)
    cv = clip_vision_h()
    model = build_model(device)
    refs = torch.rand(args.frames, 224, 224, 3, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ipa = maps["PersonalizeIPAdapterLoader"]().load("bench_base.safetensors")[0]
        batch = maps["PersonalizeIPAdapterApplyBatch"]()
        variants = {"1 reference": batch.apply(model, ipa, 1.0, "linear", 0.0, 1.0, "V only", 0, image=refs[:1],
                                               clip_vision=cv)[0],
                    f"{args.frames} references": batch.apply(model, ipa, 1.0, "linear", 0.0, 1.0, "V only", 0, image=refs,
                                                             clip_vision=cv)[0]}
    cond = [[torch.randn(1, 77, 768), {}]]
    latent = {"samples": torch.zeros(args.frames, 4, args.size // 8, args.size // 8)}

    def run(name, m):
        t = time.perf_counter()
        with torch.inference_mode():
            nodes.KSampler().sample(m, 0, 1, 7.0, "euler", "normal", cond, cond, latent)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    times = paired_rounds(variants, run, args.rounds)
    print(f"SD1.5 UNet, {args.frames} latents of {args.size}x{args.size}, CFG batch, one step, device {device}, "
          f"{args.rounds} rounds")
    print_ratios(times, "1 reference")


def main(argv=None):
    ap = argparse.ArgumentParser(description="IP-Adapter unfold step ratio and encode peak memory")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--references", type=int, default=64)
    ap.add_argument("--encode-batch-size", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--encode-only", action="store_true")
    ap.add_argument("--unfold-only", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui or COMFYUI_PATH is required")
    if args.child:
        return encode_peak(args)
    print(f"encoding {args.references} references (ViT-H/14, 224 px), device {args.device}:")
    for bs in () if args.unfold_only else (0, 8):
        out = subprocess.run([sys.executable, __file__, "--child", "--comfyui", args.comfyui, "--device", args.device,
                              "--references", str(args.references), "--encode-batch-size", str(bs)],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        r = json.loads(out)
        print(f"  encode_batch_size {bs:>2}: peak +{r['peak_gib']:.2f} GiB, {r['seconds']:.1f} s")
    if args.encode_only:
        return
    import comfy_host

    comfy_host.bootstrap(args.comfyui, load_extras=False)
    import pack_alias
    import torch

    pack_alias.register()
    bench_unfold(args, torch.device(args.device))


if __name__ == "__main__":
    main()
