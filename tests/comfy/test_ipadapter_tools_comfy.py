"""Tier 2: the issue-14 IP-Adapter nodes in a real ComfyUI on the tiny SD1.5 / SDXL models: presets resolve on a
folder of tiny files named as the public ones (and fail listing the names), unfold picks reference i for latent i
under CFG and under ComfyUI's context windows, per-layer weights reach exactly the named layers, regions confine their
text to the mask, and the embeds / image tools run as nodes."""
import os
import types

import pytest
import tiny_adapters
import torch
from node_runner import inference_nodes

STEPS = 2


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    maps = comfy.load_pack()
    import nodes

    with torch.inference_mode():
        sd15 = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sd15"]))
        sdxl = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sdxl"]))
        cv = nodes.CLIPVisionLoader().load_clip(os.path.basename(comfy.files["clip_vision_vit-h"]))[0]
    root = tmp_path_factory.mktemp("preset_models")
    for sub in ("ipadapter", "clip_vision", "loras"):
        os.makedirs(root / sub)
    public = {"ip-adapter_sd15.safetensors": ("base", "sd15", "vit-h"),
              "ip-adapter-plus_sdxl_vit-h.safetensors": ("plus", "sdxl", "vit-h"),
              "ip-adapter-faceid-plusv2_sd15.bin": ("faceid-plus", "sd15", "vit-h"),
              "ip-adapter-plus-face_sd15.safetensors": ("base", "sd15", "vit-h")}  # named plus-face, but a base file
    for name, (fam, layout, kind) in public.items():
        tiny_adapters.write_tiny_adapter(str(root / "ipadapter" / name), fam, layout, kind, seed=3)
    os.symlink(comfy.files["clip_vision_vit-h"], root / "clip_vision" / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    comfy.tiny.write_tiny_lora(str(root / "loras" / "ip-adapter-faceid-plusv2_sd15_lora.safetensors"), "sd15", seed=4)
    g = torch.Generator().manual_seed(0)
    run = inference_nodes(maps)
    return types.SimpleNamespace(maps=run, sd15=sd15, sdxl=sdxl, cv=cv, root=root, images=torch.rand(3, 64, 64, 3, generator=g),
                                 sites=comfy.module("nodes.comfy.sites"))


@pytest.fixture
def preset_folders(env, monkeypatch):
    import folder_paths

    for sub in ("ipadapter", "clip_vision", "loras"):
        exts = folder_paths.folder_names_and_paths[sub][1]
        monkeypatch.setitem(folder_paths.folder_names_and_paths, sub, ([str(env.root / sub)], exts))
        folder_paths.filename_list_cache.pop(sub, None)
    yield
    for sub in ("ipadapter", "clip_vision", "loras"):
        folder_paths.filename_list_cache.pop(sub, None)


def sample(model, pos, neg, batch=1, cfg=1.5, seed=1, steps=STEPS):
    import nodes

    latent = {"samples": torch.zeros(batch, 4, 8, 8)}
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, steps, cfg, "euler", "normal", pos, neg, latent)[0]["samples"]


def texts(clip, a="a photo", b="blurry"):
    import nodes

    with torch.inference_mode():
        return nodes.CLIPTextEncode().encode(clip, a)[0], nodes.CLIPTextEncode().encode(clip, b)[0]


def test_presets_resolve_and_check_the_keys(env, preset_folders):
    load = env.maps["PersonalizeIPAdapterUnifiedLoader"]().load
    model, ipa, cv, face, info = load(env.sd15[0], "standard", 0.6, "CPU")
    assert ipa.name == "ip-adapter_sd15.safetensors" and ipa.spec.family == "base" and cv is not None and face is None
    assert model is env.sd15[0] and "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors" in info
    _, ipa, _, _, info = load(env.sdxl[0], "plus", 0.6, "CPU")  # SDXL detected from the model
    assert ipa.name == "ip-adapter-plus_sdxl_vit-h.safetensors" and ipa.spec.layout == "sdxl"
    with pytest.raises(ValueError, match=r"ip-adapter_sdxl\.safetensors.*Folders searched: " + str(env.root / "ipadapter")):
        load(env.sdxl[0], "vit-G", 0.6, "CPU")
    with pytest.raises(ValueError, match="no SD1.5 model"):
        load(env.sd15[0], "Portrait unnorm", 0.6, "CPU")
    with pytest.raises(ValueError, match="its keys say IP-Adapter \\(base"):
        load(env.sd15[0], "plus face", 0.6, "CPU")


def test_a_faceid_preset_brings_its_lora_and_version(env, preset_folders):
    pytest.importorskip("onnxruntime")
    import folder_paths
    import tiny_onnx_faces

    faces = env.root / "insightface"
    tiny_onnx_faces.write_tiny_pack(str(faces), "buffalo_l")
    folder_paths.add_model_folder_path("insightface", str(faces))
    model, ipa, cv, face, info = env.maps["PersonalizeIPAdapterUnifiedLoader"]().load(env.sd15[0], "FaceID Plus v2", 0.6, "CPU")
    assert ipa.plus_version == "v2" and face is not None and cv is not None
    assert "LoRA ip-adapter-faceid-plusv2_sd15_lora.safetensors at 0.6" in info and model is not env.sd15[0]
    assert len(model.patches) > len(env.sd15[0].patches)


def apply_batch(env, model, images, weight=1.0, **kw):
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load("tiny_base_sd15.safetensors")[0]
    return env.maps["PersonalizeIPAdapterApplyBatch"]().apply(model, ipa, weight, "linear", 0.0, 1.0, "V only", kw.pop("bs", 0),
                                                              image=images, clip_vision=env.cv, **kw)[0]


def apply_one(env, model, image):
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load("tiny_base_sd15.safetensors")[0]
    return env.maps["PersonalizeIPAdapterApply"]().apply(model, ipa, 1.0, "linear", 0.0, 1.0, "concat", "V only",
                                                         image=image, clip_vision=env.cv)[0]


def test_unfold_gives_latent_i_reference_i_under_cfg(env, pack_files):
    pos, neg = texts(env.sd15[1])
    refs = env.images[:2]
    got = sample(apply_batch(env, env.sd15[0], refs, bs=1), pos, neg, batch=3)
    for j, r in enumerate([0, 1, 1]):  # the last reference repeats
        want = sample(apply_one(env, env.sd15[0], refs[r:r + 1]), pos, neg, batch=3)[j]
        assert (got[j] - want).abs().max() < 1e-5
    bare = sample(env.sd15[0], pos, neg, batch=3)
    assert (got - bare).abs().max() > 1e-3


def test_unfold_follows_the_context_windows(env, pack_files):
    import comfy_extras.nodes_context_windows as cw

    pos, neg = texts(env.sd15[1])
    unfolded = apply_batch(env, env.sd15[0], env.images)
    plain = sample(unfolded, pos, neg, batch=3)
    import comfy.context_windows as ctx

    windowed_model = cw.ContextWindowsManualNode.execute(unfolded, 2, 1, ctx.ContextSchedules.STATIC_STANDARD, 1, False,
                                                         ctx.ContextFuseMethods.PYRAMID, 0)[0]
    windowed = sample(windowed_model, pos, neg, batch=3)
    # windows of 2 latents ([0, 1], [1, 2]): with the window's own indices latent 2 would take reference 1 (B), not C
    wrong = sample(apply_batch(env, env.sd15[0], env.images[:2]), pos, neg, batch=3)
    assert (wrong[2] - plain[2]).abs().max() > 1e-2
    # the windows' own numerics (their smaller batches and the fusing) move a bare model by ~1e-4 too
    assert (windowed - plain).abs().max() < 1e-3


def test_layer_weights_reach_exactly_the_named_layers(env, pack_files):
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load("tiny_base_sdxl.safetensors")[0]
    run = env.maps["PersonalizeIPAdapterApplyLayerWeights"]().apply
    model = run(env.sdxl[0], ipa, 0.5, "3:1.0, 69:2.0", "cross-attention layer", 0.0, 1.0, "concat", "V only",
                image=env.images[:1], clip_vision=env.cv)[0]
    attn2 = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    ours = {k: v for k, v in attn2.items() if hasattr(v, "callback") and v.callback}
    unet = comfy_unet(env)
    _, sites, _ = unet.discover_sites(env.sdxl[0])
    assert set(ours) == {sites[3].key, sites[69].key}
    patch = next(iter(ours.values())).callback[0].patch
    assert patch.site_weights == {sites[3].adapter_index: (0.5, False), sites[69].adapter_index: (1.0, False)}
    with pytest.raises(ValueError, match="lists 3 weights but this model has 70"):
        run(env.sdxl[0], ipa, 1.0, "1, 1, 1", "cross-attention layer", 0.0, 1.0, "concat", "V only", image=env.images[:1],
            clip_vision=env.cv)
    by_t = run(env.sdxl[0], ipa, 1.0, ",".join(["0"] * 10 + ["1"]), "transformer", 0.0, 1.0, "concat", "V only",
               image=env.images[:1], clip_vision=env.cv)[0]
    keys = {k for k, v in by_t.model_options["transformer_options"]["patches_replace"]["attn2"].items() if v.callback}
    assert keys == {s.key for s in sites if s.transformer_index == 10}


def comfy_unet(env):
    import sys

    return sys.modules[next(k for k in sys.modules if k.endswith("ComfyUI-Personalize.nodes.comfy.unet"))]


@pytest.fixture(scope="module")
def pack_files(comfy):
    ipa_dir = os.path.join(comfy.models_dir, "ipadapter")
    os.makedirs(ipa_dir, exist_ok=True)
    for layout in ("sd15", "sdxl"):
        path = os.path.join(ipa_dir, f"tiny_base_{layout}.safetensors")
        if not os.path.exists(path):
            tiny_adapters.write_tiny_adapter(path, "base", layout, "vit-h", seed=7)
    import folder_paths

    folder_paths.filename_list_cache.pop("ipadapter", None)


def test_regions_confine_their_text_and_image_prompt(env, pack_files):
    import nodes

    clip = env.sd15[1]
    glob, neg = texts(clip, "a landscape", "")
    b, _ = texts(clip, "a red car", "")
    c, _ = texts(clip, "a blue boat", "")
    left = torch.zeros(1, 64, 64)
    left[:, :, :32] = 1.0
    region = env.maps["PersonalizeIPAdapterRegion"]().region
    regs_b, pos_b, _ = region(env.images[:1], left, 1.0, 1.0, "linear", 0.0, 1.0, positive=b)
    _, pos_c, _ = region(env.images[:1], left, 1.0, 1.0, "linear", 0.0, 1.0, positive=c)
    with torch.inference_mode():
        both_b = nodes.ConditioningCombine().combine(glob, pos_b)[0]
        both_c = nodes.ConditioningCombine().combine(glob, pos_c)[0]
    # one step: each latent pixel's update is its own prediction's, so what the text changes shows where it acts
    out_b, out_c = sample(env.sd15[0], both_b, neg, cfg=1.0, steps=1), sample(env.sd15[0], both_c, neg, cfg=1.0, steps=1)
    assert (out_b[..., :4] - out_c[..., :4]).abs().max() > 1e-3  # the region's text acts in the left half...
    assert (out_b[..., 4:] - out_c[..., 4:]).abs().max() < 1e-5  # ... and nowhere else
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load("tiny_base_sd15.safetensors")[0]
    regs = env.maps["PersonalizeIPAdapterCombineRegions"]().combine(regs_b, region(env.images[1:2], 1 - left, 0.5, 1.0,
                                                                                         "linear", 0.0, 1.0)[0])[0]
    model = env.maps["PersonalizeIPAdapterApplyRegions"]().apply(env.sd15[0], ipa, env.cv, regs, "concat", "V only")[0]
    site = next(v for v in model.model_options["transformer_options"]["patches_replace"]["attn2"].values() if v.callback)
    masks = [cb.patch.mask for cb in site.callback]
    assert len(masks) == 2 and torch.equal(masks[0], left) and torch.equal(masks[1], 1 - left)


def test_embeds_and_image_tools_as_nodes(env, pack_files):
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load("tiny_base_sd15.safetensors")[0]
    encode = env.maps["PersonalizeIPAdapterEncode"]().encode
    e1, e2 = encode(ipa, env.cv, env.images[:2])[0], encode(ipa, env.cv, env.images[2:])[0]
    combine = env.maps["PersonalizeIPAdapterCombineEmbeds"]().combine
    cat = combine(e1, "concat", embed2=e2)[0]
    assert cat.cond.shape[0] == 3 and cat.uncond.shape[0] in (1, 3)
    sub = combine(e1, "subtract", embed2=e2)[0]
    assert torch.allclose(sub.cond, e1.cond[:1] - torch.cat([e1.cond[1:], e2.cond]).mean(0, keepdim=True))
    noise = env.maps["PersonalizeIPAdapterNoise"]().make("dissolve", 0.5, 3, 9, image=env.images[:1])[0]
    assert noise.shape == (1, 224, 224, 3)
    prep = env.maps["PersonalizePrepImageForClipVision"]().prep(torch.rand(1, 80, 160, 3), "LANCZOS", "left", 0.2, 224)[0]
    assert prep.shape == (1, 224, 224, 3)
    tiled, tiles, masks = env.maps["PersonalizeIPAdapterEncodeTiled"]().encode(ipa, env.cv, torch.rand(1, 100, 300, 3), 0.0)
    assert tiled.cond.shape[0] == tiles.shape[0] == masks.shape[0] == 3
    pos, neg = texts(env.sd15[1])
    model = env.maps["PersonalizeIPAdapterApply"]().apply(env.sd15[0], ipa, 1.0, "linear", 0.0, 1.0, "concat", "V only",
                                                          embeds=tiled, image_negative=None)[0]
    assert torch.isfinite(sample(model, pos, neg)).all()
    precise = env.maps["PersonalizeIPAdapterApply"]().apply(env.sd15[0], ipa, 1.0, "style transfer precise", 0.0, 1.0,
                                                            "concat", "V only", image=env.images[:1], clip_vision=env.cv,
                                                            image_negative=noise)[0]
    assert (sample(precise, pos, neg) - sample(env.sd15[0], pos, neg)).abs().max() > 1e-3
