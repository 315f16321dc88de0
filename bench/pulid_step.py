"""PuLID cost on real-size random-weight models: the ID encoding of one reference image, and the sampling step time
with PuLID against a bare step on a full-size SDXL UNet.

    COMFYUI_PATH=/path/to/ComfyUI python bench/pulid_step.py [--size 512] [--steps 2] [--rounds 2] [--device cpu|cuda]

- Encoding (PuLID Encode's stages, medians of --repeats): face analysis (SCRFD-10G-like detector + iResNet100 at real
  size, devtools/tiny_onnx_faces.py --bench), FFHQ alignment, BiSeNet parsing (facexlib's architecture, 13.3 M), the
  EVA02-CLIP-L-14-336 tower (timm, 304 M), and the v1.1 IDFormer (151 M) for the tokens.
- Sampling: the real ComfyUI KSampler (euler, CFG batch of cond + uncond) on the same SDXL UNet (2.6 B parameters),
  bare and with PuLID v1.1 'fidelity' (ortho_v2, 20 zero tokens: the costliest rule) and 'style' (ortho, 16) on all 70
  cross-attention layers; ratios to the bare step. Target: <= 1.10x. Variants interleave round by round.
Random weights: the numbers are costs, not pictures.
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

# Full-size SDXL base UNet (comfy.supported_models.SDXL; model_detection of sd_xl_base_1.0).
SDXL_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
             "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
             "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
             "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
             "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
             "use_temporal_resblock": False}
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10  # checkpoint (diffusers) order
# PuLID v1.1's IDFormer (encoders_transformer.py defaults) and EVA02-CLIP-L-14-336 (timm eva02_large_patch14_clip_336).
IDFORMER = dict(dim=1024, depth=10, heads=16, num_id_token=5, num_queries=32, output_dim=2048, ff_mult=4, width=1280,
                vit_width=1024, hidden=1024)
EVA_L = dict(img_size=336, patch_size=14, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4 * 2 / 3, qkv_fused=False,
             swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16),
             global_pool="token", num_classes=768)


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def randomize(module, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 if p.ndim > 1 else torch.ones(p.shape) if "norm" in name
                    else torch.zeros(p.shape))
    return module


def write_pulid(path):
    import torch
    from safetensors.torch import save_file

    from comfyui_personalize.models import pulid

    encoder = randomize(pulid.IDFormer(**IDFORMER), 1)
    g = torch.Generator().manual_seed(2)
    sd = {f"id_adapter.{k}": v.contiguous() for k, v in encoder.state_dict().items()}
    for k, w in enumerate(SDXL_WIDTHS):
        for name in ("id_to_k", "id_to_v"):
            sd[f"id_adapter_attn_layers.{2 * k + 1}.{name}.weight"] = torch.randn(w, 2048, generator=g) * 0.02
    save_file(sd, path)


def bench_encoding(device, repeats):
    import numpy as np
    import tiny_onnx_faces
    import torch

    from comfyui_personalize.models import pulid
    from comfyui_personalize.models.eva_clip import EVAVisionTower
    from comfyui_personalize.models.face import FaceAnalysis, image_to_uint8
    from comfyui_personalize.models.face.image import ffhq_crop
    from comfyui_personalize.models.face.parsing import BiSeNet, face_only

    root = tempfile.mkdtemp(prefix="personalize_bench_faces_")
    tiny_onnx_faces.write_bench_pack(root, "antelopev2")
    fa = FaceAnalysis.from_pack("antelopev2", [root], "CPU")
    image = torch.rand(1, 768, 1024, 3, generator=torch.Generator().manual_seed(0))
    img = image_to_uint8(image)[0]
    kps = np.float32([[420, 330], [600, 330], [510, 430], [440, 530], [590, 530]])
    det_s = _median(lambda: fa.detect(img, (640,), image_index=0), repeats)
    rec_s = _median(lambda: fa.recognizer.embed(img, kps), repeats)
    crop = torch.from_numpy(ffhq_crop(img, kps)).permute(2, 0, 1)[None].float().div(255).to(device)
    align_s = _median(lambda: ffhq_crop(img, kps), repeats)
    parser = randomize(BiSeNet(), 3).eval().to(device)
    eva = EVAVisionTower(EVA_L).eval().to(device)
    randomize(eva, 4)
    encoder = randomize(pulid.IDFormer(**IDFORMER), 5).eval().to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        faces = face_only(crop, parser)
        parse_s = _median(lambda: (face_only(crop, parser), sync()), repeats)
        x = pulid.eva_input(faces, 336)
        eva_s = _median(lambda: (eva(x), sync()), repeats)
        pooled, hidden = eva(x)
        cond = pulid.id_cond(torch.randn(1, 512, device=device), pooled)
        enc_s = _median(lambda: (encoder(cond[None], hidden), sync()), repeats)
    total = det_s + rec_s + align_s + parse_s + eva_s + enc_s
    print(f"ID encoding of one 1024x768 image, device {device}, torch threads {torch.get_num_threads()} (median of {repeats}):")
    for name, s in (("detection 640", det_s), ("ArcFace", rec_s), ("FFHQ alignment", align_s), ("BiSeNet parsing", parse_s),
                    ("EVA02-CLIP-L-14-336", eva_s), ("IDFormer (v1.1)", enc_s), ("total", total)):
        print(f"  {name:22s} {s * 1000:9.1f} ms")


def bench_sampling(args, device):
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.utils
    import comfy_host
    import nodes
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    folder = tempfile.mkdtemp(prefix="personalize_bench_")
    os.makedirs(os.path.join(folder, "pulid"))
    write_pulid(os.path.join(folder, "pulid", "bench_pulid_v1.1.safetensors"))
    comfy_host.use_models_dir(folder, folder_names=("pulid",))
    maps = comfy_host.load_pack(ROOT)
    core = sys.modules[next(k for k in sys.modules if k.endswith("ComfyUI-Personalize.models.pulid"))]

    config = comfy.model_detection.model_config_from_unet_config(dict(SDXL_UNET))
    config.set_inference_dtype(torch.float16 if device.type == "cuda" else torch.float32, None)
    model = comfy.model_patcher.ModelPatcher(randomize(config.get_model({}, device=device), 6), load_device=device,
                                             offload_device=torch.device("cpu"))
    loaded = maps["PersonalizePuLIDLoader"]().load("bench_pulid_v1.1.safetensors")[0]
    g = torch.Generator().manual_seed(7)
    embeds = core.PuLIDEmbeds(torch.randn(1, 1280, generator=g), [torch.randn(1, 577, 1024, generator=g) for _ in range(5)])
    variants = {"none": model}
    for method in ("fidelity", "style"):
        variants[method] = maps["PersonalizePuLIDApply"]().apply(model, loaded, embeds, method, 0.8, 0.0, 1.0)[0]
    cond = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    latent = {"samples": torch.zeros(1, 4, args.size // 8, args.size // 8)}
    sampler = nodes.KSampler()

    def run(m, steps):
        t0 = time.perf_counter()
        with torch.inference_mode():
            sampler.sample(m, 0, steps, 7.0, "euler", "normal", cond, cond, latent)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    for m in variants.values():  # warm-up
        run(m, 1)
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, m in variants.items():
            times[k].append(run(m, args.steps))
    base = statistics.median(times["none"])
    print(f"SDXL UNet, {args.size}x{args.size}, CFG batch 2, {args.steps} steps x {args.rounds} rounds, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:>8}: {med:8.3f} s/step  ratio {med / base:5.3f}x  (runs: {', '.join(f'{t:.3f}' for t in ts)})")


def main(argv=None):
    ap = argparse.ArgumentParser(description="PuLID encoding latency and step-time ratios (real sizes, random weights)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-sampling", action="store_true")
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui or COMFYUI_PATH is required")
    import comfy_host

    comfy_host.bootstrap(args.comfyui, load_extras=False)
    if args.device != "cpu":
        from comfy.cli_args import args as comfy_args
        comfy_args.cpu = False
    import pack_alias
    import torch

    pack_alias.register()
    device = torch.device(args.device)
    bench_encoding(device, args.repeats)
    if not args.skip_sampling:
        bench_sampling(args, device)


if __name__ == "__main__":
    main()
