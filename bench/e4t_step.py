# SPDX-License-Identifier: GPL-3.0-or-later
"""E4T sampling step time relative to a bare step, and E4T tuning steps, on a full-size SD1.5 with random weights in a
real headless ComfyUI, through the pack's own nodes.

    COMFYUI_PATH=/path/to/ComfyUI python bench/e4t_step.py [--size 256] [--steps 2] [--rounds 2] [--device cpu|cuda]
        [--tune-size 256] [--tune-batch 1] [--tune-steps 2] [--mem-budget-gb 12] [--tune-checkpointing] [--skip-tune]

What is built (random weights, real sizes): the SD1.5 UNet (860M, as bench/ipadapter_step.py builds it: fp32 on CPU,
fp16 on CUDA), the SD1.5 CLIP-L text encoder (123M: ComfyUI's SD1ClipModel and tokenizer), and an E4T folder in
mkshing/e4t-diffusion's layout written by ``devtools/tiny_e4t.py`` at full size (safetensors): the OpenCLIP ViT-H-14
image tower (the real 32 layers x 1280, 631M, loaded by ComfyUI's CLIP-vision loader; it runs once per Apply and once
per Tune, never per step), the head (10880 feature channels, hidden 1280, 129 inputs, word 768: 231M) and the weight
offsets (96 q/k/v targets, 143M). The VAE is a tiny TAESD (it only encodes the one tuning image, once). The UNet and
the text encoder are made under inference mode, as ComfyUI's executor loads a checkpoint.

Sampling: ComfyUI's sampler (``nodes.common_ksampler``: euler, CFG 7 with cond + uncond batched) at ``--size`` on

- ``bare``: the model with plain CLIPTextEncode conditionings;
- ``e4t per-step``: the model and conditionings of ``apply_e4t(..., "per_step")`` (the reference: the word embedding
  recomputed at every step by the pack's diffusion-model wrapper);
- ``e4t static``: ``apply_e4t(..., "static")`` (embedding computed once; the same baked offsets).

Each timed run samples ``steps + 1`` steps and times the last ``steps`` from ComfyUI's progress hook: the first step
carries the model load, which for an E4T model loaded after another variant includes the bake of the offsets into the
96 weights (printed apart, with the other one-time costs). Variants interleave round by round, each round starting
with the next one, so that machine noise and order hit them alike; the table gives the median over rounds.

Floors: the baked offsets cost nothing per step (the weights are patched once per load), so static is 1.00x. The
per-step mode adds, on the cond rows only, a pass of the input + middle blocks (about a third of a UNet's FLOPs), the
head and the text encoder; with CFG batched (two rows, one of them E4T) that is about 1 + 0.33 / 2 = 1.17x plus the
head and the text encoder (about 1.2x). The parts are timed on their own too, with the ratio they predict.

Tuning: ``--tune-steps`` steps of the E4T Tune node (``PersonalizeE4TTune.tune`` under inference mode, as the executor
runs it; node defaults otherwise: fp32, gradient checkpointing only with ``--tune-checkpointing``), each step timed
from the node's progress bar; the node's own setup and its saves (the LoRA, the encoder folder and the resumable
state) are printed apart. Both modes, light (offsets + LoRA + head) and reference (every UNet weight + offsets +
head), run where their memory fits: on CPU a mode runs only if the RSS now plus the node's own estimate
(``nodes.e4t.tuning_memory``: trainable state, activations, weight copies, offset graph; the weights are resident)
fits ``--mem-budget-gb`` (otherwise the estimate is printed and the mode skipped); on CUDA the node's own check
decides. What a step saves for its backward is measured with torch's saved-tensor hooks and printed beside the
estimate's per-step parts. On CUDA (default: the reference's 512 px, batch 16) the peak is
``torch.cuda.max_memory_allocated``; on CPU it is the process RSS sampled during the node call.
"""
from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "devtools"))
sys.path.insert(0, HERE)

log = logging.getLogger("personalize.bench")

CFG = 7.0
SAMPLER, SCHEDULER = "euler", "normal"
PROMPT_E4T, PROMPT_BARE = "a photo of *s", "a photo of face"
E4T_NAME = "bench_e4t_sd15"
# open_clip ViT-H-14 (laion2b_s32b_b79k): the image tower the public E4T encoder holds.
VIT_H_WIDTH, VIT_H_LAYERS, VIT_H_HEADS = 1280, 32, 16
GB = 2 ** 30
UNET_B2 = "UNet forward, CFG batch 2 (the bare step's core)"
WRAPPER_TOTAL = "all of the wrapper's work (encode_rows)"
TUNE_MODES = {"light": "light (offsets + LoRA + encoder; not the reference)",
              "reference": "reference (all UNet weights + offsets + encoder)"}
# The parts of the Tune node's memory estimate that one step keeps for its backward (SavedForBackward measures them).
PER_STEP_PARTS = ("activations", "weight copies", "offset graph")


def build_clip():
    """The SD1.5 text encoder (CLIP-L, ComfyUI's SD1ClipModel and tokenizer) with random weights."""
    import comfy.sd
    import comfy.supported_models
    from ipadapter_step import fill_random_

    clip = comfy.sd.CLIP(comfy.supported_models.SD15({}).clip_target())
    fill_random_(clip.cond_stage_model, seed=3)
    return clip


def write_e4t(models_dir: str) -> str:
    import tiny_e4t

    folder = os.path.join(models_dir, "e4t", E4T_NAME)
    targets = tiny_e4t.sd15_offset_targets(320, (1, 2, 4, 4), 768)
    tiny_e4t.write_tiny_e4t(folder, offset_targets=targets, feature_channels=tiny_e4t.sd15_feature_channels(320, (1, 2, 4, 4)),
                            clip_hidden=VIT_H_WIDTH, clip_layers=VIT_H_LAYERS, clip_heads=VIT_H_HEADS, word_dim=768,
                            fmt="safetensors", seed=0)
    return folder


def params(module) -> int:
    return sum(p.numel() for p in module.parameters())


class PeakRSS:
    """The process's resident memory, sampled every ``interval`` seconds while active (Linux /proc)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return 0

    def __enter__(self):
        self.start = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="E4T sampling step-time ratios and tuning steps (full-size SD1.5, random weights)")
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, "..", "shared", "ComfyUI"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--size", type=int, default=None, help="sampling size in pixels (default 256 on CPU, 512 on CUDA)")
    ap.add_argument("--steps", type=int, default=2, help="timed sampler steps per run (one more runs untimed first)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tune-size", type=int, default=None, help="tuning crop (default 256 on CPU, 512 on CUDA)")
    ap.add_argument("--tune-batch", type=int, default=None, help="tuning batch (default 1 on CPU, 16 on CUDA)")
    ap.add_argument("--tune-steps", type=int, default=2, help="tuning steps per mode (the first carries the optimizer's setup)")
    ap.add_argument("--mem-budget-gb", type=float, default=12.0,
                    help="CPU: run a tuning mode only if the RSS now plus the estimate of what it adds fits")
    ap.add_argument("--tune-checkpointing", action="store_true", help="the Tune node's gradient_checkpointing option")
    ap.add_argument("--skip-tune", action="store_true")
    return ap


def parse(argv=None):
    ap = parser()
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.size = args.size or (512 if cuda else 256)
    args.tune_size = args.tune_size or (512 if cuda else 256)
    args.tune_batch = args.tune_batch or (16 if cuda else 1)
    if not os.path.isfile(os.path.join(args.comfyui, "nodes.py")):
        ap.error(f"no ComfyUI at {args.comfyui}: give --comfyui or COMFYUI_PATH")
    return args


def start_comfy(args):
    """Bootstrap ComfyUI (on CUDA: with model management on the GPU), set the progress hook; the pack's modules."""
    comfy_path = os.path.realpath(args.comfyui)
    if args.device == "cuda":  # comfy_host.bootstrap forces CPU; ComfyUI reads the flag when model_management is imported
        sys.path.insert(0, comfy_path)
        from comfy.cli_args import args as comfy_args

        comfy_args.cpu = False
        import comfy.model_management  # noqa: F401
    import comfy_host

    comfy_host.bootstrap(comfy_path, load_extras=False)
    import comfy.model_management as mm
    import comfy.utils
    import nodes
    import torch

    comfy.utils.PROGRESS_BAR_ENABLED = False
    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    if args.device == "cuda" and not cuda:
        raise SystemExit(f"--device cuda, but ComfyUI's compute device is {device}")
    env = types.SimpleNamespace(device=device, cuda=cuda, stamps=[], host=comfy_host, host_nodes=nodes, on_step=None,
                                sync=torch.cuda.synchronize if cuda else (lambda: None))

    def hook(value, total, preview, node_id=None):  # ComfyUI's progress hook: the sampler's and the Tune node's bars
        env.sync()
        env.stamps.append((int(value), time.perf_counter()))
        if env.on_step is not None:
            env.on_step()

    comfy.utils.set_progress_bar_global_hook(hook)
    env.models_dir = tempfile.mkdtemp(prefix="personalize_bench_e4t_")
    atexit.register(shutil.rmtree, env.models_dir, True)
    return env


def attach_pack(env) -> None:
    host = env.host
    env.maps = host.load_pack(ROOT)
    env.node = host.pack_module(ROOT, "nodes.e4t")
    env.core = host.pack_module(ROOT, "models.e4t")
    env.unet = host.pack_module(ROOT, "nodes.comfy.unet")
    env.weights = host.pack_module(ROOT, "nodes.comfy.weights")
    env.tuning = host.pack_module(ROOT, "training.e4t")
    env.attention_targets = host.pack_module(ROOT, "training.lora").ATTENTION_TARGETS


def build_full(env):
    """The full-size objects: the E4T folder written and loaded by the pack's loader, the UNet, the text encoder, a VAE."""
    import nodes
    import tiny_models
    import torch
    from ipadapter_step import build_model

    t = time.perf_counter()
    write_e4t(env.models_dir)
    log.info("wrote the full-size E4T folder in %.1f s", time.perf_counter() - t)
    vae_path = tiny_models.write_tiny_vae(os.path.join(env.models_dir, "vae", "bench_taesd.safetensors"))
    env.host.use_models_dir(env.models_dir, ("e4t",))
    attach_pack(env)
    one_time = {}
    with torch.inference_mode():  # as ComfyUI's executor runs the loaders
        t = time.perf_counter()
        e4t = env.maps["PersonalizeE4TLoader"]().load(E4T_NAME)[0]
        one_time["E4T Loader (files -> head, offsets, ComfyUI CLIP-vision)"] = time.perf_counter() - t
        gc.collect()
        model = build_model(env.device)
        clip = build_clip()
        vae = nodes.VAELoader().load_vae(os.path.basename(vae_path))[0]
    log.info("built the SD1.5 UNet and text encoder")
    return types.SimpleNamespace(model=model, clip=clip, vae=vae, e4t=e4t, one_time=one_time)


def main(argv=None):
    args = parse(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    wall0 = time.perf_counter()
    env = start_comfy(args)
    objs = build_full(env)
    run(args, env, objs)
    print(f"wall time {time.perf_counter() - wall0:.0f} s")


def run(args, env, objs) -> None:
    import comfy.model_management as mm
    import torch

    model, clip, e4t = objs.model, objs.clip, objs.e4t
    node, sync = env.node, env.sync
    tower = e4t.clip_vision.model.vision_model
    n = {"UNet": params(model.model.diffusion_model), "text": params(clip.cond_stage_model), "tower": params(tower),
         "head": params(e4t.head), "offsets": params(e4t.weights.offsets)}
    head = e4t.head
    print(f"SD1.5 (random weights): UNet {n['UNet'] / 1e6:.0f}M, CLIP-L text {n['text'] / 1e6:.0f}M; E4T: head "
          f"{n['head'] / 1e6:.0f}M ({head.feature_channels} -> {head.hidden} x {head.n_inputs} -> {head.word_dim}), offsets "
          f"{n['offsets'] / 1e6:.0f}M on {len(e4t.weights.offsets.names)} q/k/v, ViT tower {len(tower.encoder.layers)} layers x "
          f"{tower.embeddings.class_embedding.shape[0]} ({n['tower'] / 1e6:.0f}M, once per Apply / Tune)")

    one_time = dict(objs.one_time)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 512, 512, 3, generator=g)  # an IMAGE batch of one
    pixels = node.image_pixels(image)
    with torch.inference_mode():
        t = time.perf_counter()
        e4t.deltas()
        one_time["dW of the offsets (once per E4T model; per step in tuning)"] = time.perf_counter() - t
        t = time.perf_counter()
        clip_in = node.clip_inputs_of(e4t, pixels)
        one_time["ViT tower on the image (inside each Apply)"] = time.perf_counter() - t
        variants = {"bare": (model, env.host_nodes.CLIPTextEncode().encode(clip, PROMPT_BARE)[0],
                             env.host_nodes.CLIPTextEncode().encode(clip, "")[0])}
        conditioner = None
        for label, mode in (("e4t per-step", "per_step"), ("e4t static", "static")):
            t = time.perf_counter()
            patched, pos, neg, cond = node.apply_e4t(model, clip, e4t, pixels, PROMPT_E4T, mode)
            one_time[f"Apply ({mode}; tower, static pass at {node.STATIC_LATENT_SIDE * 8} px, bake, text)"] = time.perf_counter() - t
            variants[label] = (patched, pos, neg)
            conditioner = cond or conditioner
        static_model = variants["e4t static"][0]
        t = time.perf_counter()
        node.static_embedding(static_model, e4t, clip_in, conditioner.class_embed, conditioner.empty)
        one_time[f"  of which the static embedding (input + middle pass at {node.STATIC_LATENT_SIDE * 8} px, head)"] = \
            time.perf_counter() - t
        # the bake: ComfyUI patches the offset targets when an E4T model loads after another variant
        mm.load_models_gpu([model])
        sync()
        t = time.perf_counter()
        mm.load_models_gpu([static_model])
        sync()
        one_time["bake on load (W * (1 + dW) into the q/k/v weights, after another model)"] = time.perf_counter() - t
        t = time.perf_counter()
        mm.load_models_gpu([model])
        sync()
        one_time["restore on load of the bare model"] = time.perf_counter() - t
    del static_model, patched, pos, neg, cond

    lat = args.size // 8
    latent = {"samples": torch.zeros(1, 4, lat, lat)}

    def sample(m, positive, negative, steps):
        """(seconds per step over the last ``steps``, seconds of the first step with the load)."""
        env.stamps.clear()
        t0 = time.perf_counter()
        with torch.inference_mode():
            env.host_nodes.common_ksampler(m, 0, steps + 1, CFG, SAMPLER, SCHEDULER, positive, negative, latent)
        sync()
        ends = [s for v, s in env.stamps if v >= 1]
        if len(ends) != steps + 1:
            raise RuntimeError(f"expected {steps + 1} progress updates from the sampler, got {len(ends)}")
        return (ends[-1] - ends[0]) / steps, ends[0] - t0

    log.info("warm-up (one sampler run per variant)")
    for m, pos, neg in variants.values():
        sample(m, pos, neg, 1)
    calls0 = conditioner.calls
    times = {k: [] for k in variants}
    first = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # each round starts with the next variant
            m, pos, neg = variants[k]
            per, first_step = sample(m, pos, neg, args.steps)
            times[k].append(per)
            first[k].append(first_step)
            log.info("round %d %-13s %.3f s/step", r + 1, k, per)
    wrapper_calls = (conditioner.calls - calls0) / (args.rounds * (args.steps + 1))
    with torch.inference_mode():
        comp = components(env, variants["e4t per-step"], conditioner, clip, e4t, lat)

    base = statistics.median(times["bare"])
    print(f"sampling: {args.size}x{args.size}, {SAMPLER}, CFG {CFG:g} (cond + uncond batched), {args.steps} timed steps x "
          f"{args.rounds} rounds, device {env.device}, UNet {env.unet.compute_dtype(model)}, torch threads {torch.get_num_threads()}")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"{k:>13}: {med:8.3f} s/step  ratio {med / base:5.3f}x  (runs: {', '.join(f'{v:.3f}' for v in ts)}; "
              f"first step with the load: {', '.join(f'{v:.2f}' for v in first[k])} s)")
    print(f"per-step wrapper: {wrapper_calls:.2f} re-encodes per sampler step (cond row only)")
    unet_b2 = comp[UNET_B2]
    for k, v in comp.items():
        share = f"  ({v / unet_b2:5.3f} of the batch-2 UNet)" if k != UNET_B2 else ""
        print(f"  part: {k:<50} {v:7.3f} s{share}")
    print(f"  ratio the parts predict for per-step: {1 + comp[WRAPPER_TOTAL] / unet_b2:5.3f}x "
          "(floor: 1 + 0.33 / 2 = 1.17x plus head and text encoder)")
    print("one-time costs (the offsets are baked into the weights when the model loads: no per-step cost):")
    for k, v in one_time.items():
        print(f"  {k:<78} {v:7.2f} s")

    del variants, conditioner, m, pos, neg
    mm.unload_all_models()
    gc.collect()
    if not args.skip_tune:
        tune_section(args, env, objs, image)


def components(env, variant, conditioner, clip, e4t, lat) -> dict[str, float]:
    """Seconds of the per-step wrapper's parts on the cond row (the best of two), and of the batch-2 UNet forward, on
    the E4T model as sampling loads it."""
    import comfy.model_management as mm
    import torch

    core, unet, device, sync = env.core, env.unet, env.device, env.sync
    patched, pos, neg = variant
    mm.load_models_gpu([patched, clip.patcher, e4t.head_patcher])
    dm = patched.model.diffusion_model
    dtype = unet.compute_dtype(patched)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, lat, lat, generator=g).to(device, dtype)
    ts = torch.tensor([500.0, 500.0], device=device)
    ctx = torch.cat([pos[0][0], neg[0][0]]).to(device, dtype)
    empty = conditioner.empty.to(device, dtype)
    head = e4t.head_patcher.model
    hp = next(head.parameters())

    def timed(fn, reps=2):
        best, out = None, None
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            dt = time.perf_counter() - t0
            best = dt if best is None else min(best, dt)
        return best, out

    comp = {}
    comp[UNET_B2], _ = timed(lambda: dm(x, timesteps=ts, context=ctx))
    comp["input + middle blocks, 1 row"], feats = timed(lambda: unet.down_mid_features(dm, x[:1], ts[:1], empty))
    pooled = core.pool_features(feats).to(hp)
    clip_in = conditioner.clip_inputs.to(hp)
    comp["E4T head, 1 row"], enc = timed(lambda: head(clip_in, pooled))
    e = core.domain_embedding(conditioner.class_embed.to(hp), enc, conditioner.scale)
    comp["text encoder with the slot, 1 row"], _ = timed(lambda: conditioner.prompt.encode(e.float()))
    comp[WRAPPER_TOTAL], _ = timed(lambda: conditioner.encode_rows(dm, x[:1], ts[:1]))
    return comp


def tune_estimates(args, env, objs) -> dict[str, tuple[int, dict[str, int]]]:
    """``{mode: (trainable parameters, {part: bytes})}``: the Tune node's own estimate (``nodes.e4t.tuning_memory``)."""
    import torch

    model, e4t, w = objs.model, objs.e4t, env.weights
    head_n, offsets_n = params(e4t.head), params(e4t.weights.offsets)
    unet_n = sum(int(torch.Size(s).numel()) for s in w.unet_weight_shapes(model).values())
    lora_n = params(w.training_lora(model, env.attention_targets, env.node.LIGHT_LORA_RANK, None, 0))
    out = {}
    for mode, trainable in (("light", head_n + offsets_n + lora_n), ("reference", head_n + offsets_n + unet_n)):
        out[mode] = (trainable, env.node.tuning_memory(model, trainable, e4t.weights.offsets, args.tune_batch,
                                                       args.tune_size, args.tune_checkpointing))
    return out


class SavedForBackward:
    """Bytes of the distinct storages autograd saves for the backward, per tuning step (reset by :meth:`next_step`),
    leaving out leaf tensors that require grad (the trainable parameters themselves, counted in the trainable state)
    and the model's own weights: what the estimate calls activations + weight copies + offset graph."""

    def __init__(self, exclude_ptrs: set[int]):
        self.exclude, self.current, self.steps = exclude_ptrs, {}, []

    def pack(self, t):
        if not (t.is_leaf and t.requires_grad):
            try:
                st = t.untyped_storage()
                if st.data_ptr() not in self.exclude:
                    self.current[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                pass
        return t

    def next_step(self) -> None:
        if self.current:
            self.steps.append(sum(self.current.values()))
        self.current = {}

    def __enter__(self):
        import torch

        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self.next_step()


def tune_section(args, env, objs, image) -> None:
    import comfy.model_management as mm
    import torch

    estimates = tune_estimates(args, env, objs)
    model_ptrs = {p.untyped_storage().data_ptr() for p in objs.model.model.diffusion_model.parameters()}
    results = []
    for mode in ("light", "reference"):
        trainable, parts = estimates[mode]
        note = (f"trainable {trainable / 1e6:.0f}M; the node's estimate {sum(parts.values()) / GB:.1f} GB ("
                + ", ".join(f"{k} {v / GB:.1f}" for k, v in parts.items()) + ")")
        if not env.cuda:
            added = sum(v for k, v in parts.items() if k != "model weights")  # the weights are resident already
            now = PeakRSS.rss()
            if now + added > args.mem_budget_gb * GB:
                results.append((mode, None, note + f"; RSS now {now / GB:.1f} GB + {added / GB:.1f} GB it adds = "
                                                   f"{(now + added) / GB:.1f} GB > --mem-budget-gb {args.mem_budget_gb:g}: skipped"))
                continue
        log.info("tuning, %s mode, %d px batch %d, %d steps", mode, args.tune_size, args.tune_batch, args.tune_steps)
        if env.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        env.stamps.clear()
        t0 = time.perf_counter()
        saved = SavedForBackward(model_ptrs)
        env.on_step = saved.next_step
        try:
            with PeakRSS() as rss, saved, torch.inference_mode():  # as ComfyUI's executor runs the node
                out = env.maps["PersonalizeE4TTune"]().tune(
                    objs.model, objs.clip, objs.vae, objs.e4t, image, args.tune_steps, env.core.LEARNING_RATE,
                    args.tune_batch, env.core.TUNE_REG_LAMBDA, TUNE_MODES[mode], 0, f"bench_e4t_{mode}", False,
                    resolution=args.tune_size, gradient_checkpointing=args.tune_checkpointing)
        except MemoryError as err:
            results.append((mode, None, note + f"; the node refused or failed: {err}"))
            mm.unload_all_models()
            gc.collect()
            continue
        finally:
            env.on_step = None
        env.sync()
        total = time.perf_counter() - t0
        marks = dict(env.stamps)
        steps = [marks[i] - marks[i - 1] for i in range(1, args.tune_steps + 1)]
        peak = torch.cuda.max_memory_allocated() / GB if env.cuda else rss.peak / GB
        what = "max_memory_allocated" if env.cuda else f"peak RSS (from {rss.start / GB:.1f} GB before the node)"
        est_step = sum(parts[k] for k in PER_STEP_PARTS)
        kept = max(saved.steps) if saved.steps else 0
        note += (f"; saved for the backward in a step (measured): {kept / GB:.2f} GB, the estimate's "
                 f"{' + '.join(PER_STEP_PARTS)}: {est_step / GB:.2f} GB")
        results.append((mode, (steps, marks[0] - t0, total - (marks[args.tune_steps] - t0), peak, what), note))
        del out
        mm.unload_all_models()
        gc.collect()

    print(f"tuning (E4T Tune node): {args.tune_size}x{args.tune_size}, batch {args.tune_batch}, {args.tune_steps} steps, "
          f"device {env.device}, fp32 trainable state, gradient checkpointing {'on' if args.tune_checkpointing else 'off'}, "
          "mixed precision no")
    for mode, res, note in results:
        if res is None:
            print(f"{mode:>10}: {note}")
            continue
        steps, before, after, peak, what = res
        print(f"{mode:>10}: {steps[-1]:8.2f} s/step (steps: {', '.join(f'{s:.2f}' for s in steps)}), {what} {peak:.2f} GB; "
              f"node setup {before:.1f} s, saves + bake after the steps {after:.1f} s")
        print(f"{'':>10}  {note}")


if __name__ == "__main__":
    main()
