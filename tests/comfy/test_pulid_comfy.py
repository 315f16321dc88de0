"""Tier 2: PuLID inside a real ComfyUI: one SDXL UNet call on the ComfyUI host equals the reference ID attention
(tests/pulid_reference.py) on the same weights converted to diffusers; the nodes load the public layouts, encode faces
through the face pipeline, refuse what does not fit, save and load ID embeds, and coexist with IP-Adapter."""
import copy
import os
import types

import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: the PuLID face pipeline needs it")
pytest.importorskip("timm", reason="timm not installed: the EVA-CLIP tower needs it")

import tiny_adapters  # noqa: E402
import tiny_onnx_faces  # noqa: E402
import tiny_pulid  # noqa: E402
from pulid_reference import RefIDProcessor  # noqa: E402

TOL = 1e-5
FACE = (640, 640, [(256, 224, 96, 255)])  # exactly one face for the tiny blob detector


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    maps = comfy.load_pack()
    import folder_paths
    import nodes

    d = comfy.models_dir
    for version, style, name in (("v1.1", "official", "tiny_pulid_v1.1.safetensors"), ("v1", "official", "tiny_pulid_v1.bin"),
                                 ("v1", "converted", "ip-adapter_pulid_tiny_fp16.safetensors")):
        tiny_pulid.write_tiny_pulid(os.path.join(d, "pulid", name), version, "sdxl", style, seed=1)
    tiny_pulid.write_tiny_eva_clip(os.path.join(d, "eva_clip", "tiny_eva02_clip_l_336.pt"))
    tiny_pulid.write_tiny_parsing(os.path.join(d, "face_parsing", "tiny_parsing_bisenet.pth"))
    os.makedirs(os.path.join(d, "ipadapter"), exist_ok=True)
    tiny_adapters.write_tiny_adapter(os.path.join(d, "ipadapter", "pulid_test_base_sdxl.safetensors"), "base", "sdxl",
                                     "vit-h", seed=2)
    faces_root = str(tmp_path_factory.mktemp("pulid_insightface"))
    tiny_onnx_faces.write_tiny_pack(faces_root, "antelopev2")
    tiny_onnx_faces.write_tiny_pack(faces_root, "buffalo_l")
    folder_paths.add_model_folder_path("insightface", faces_root)
    for name in ("pulid", "eva_clip", "face_parsing"):
        folder_paths.add_model_folder_path(name, os.path.join(d, name))
    for name in ("pulid", "eva_clip", "face_parsing", "ipadapter"):
        folder_paths.filename_list_cache.pop(name, None)
    with torch.inference_mode():
        sdxl = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sdxl"]))[0]
        sd15 = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sd15"]))[0]
    load = lambda node, *a: maps[node]().load(*a)[0]  # noqa: E731
    return types.SimpleNamespace(
        maps=maps, sdxl=sdxl, sd15=sd15, eva=load("PersonalizeEVACLIPLoader", "tiny_eva02_clip_l_336.pt"),
        parsing=load("PersonalizeFaceParsingLoader", "tiny_parsing_bisenet.pth"),
        faces=load("PersonalizeFaceAnalysisLoader", "antelopev2", "CPU"),
        buffalo=load("PersonalizeFaceAnalysisLoader", "buffalo_l", "CPU"),
        v11=load("PersonalizePuLIDLoader", "tiny_pulid_v1.1.safetensors"),
        v1=load("PersonalizePuLIDLoader", "tiny_pulid_v1.bin"),
        converted=load("PersonalizePuLIDLoader", "ip-adapter_pulid_tiny_fp16.safetensors"))


def face_image(n=1):
    h, w, squares = FACE
    return torch.from_numpy(tiny_onnx_faces.squares_image(h, w, squares)).float().div(255)[None].repeat(n, 1, 1, 1)


def encode(env, image=None, analysis=None):
    return env.maps["PersonalizePuLIDEncode"]().encode(analysis or env.faces, env.eva, env.parsing,
                                                       face_image() if image is None else image, "largest", 0)


def attn2(model):
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})


def unet_call(model, x, t, ctx, y, chunks, sigma=1.0):
    to = dict(model.model_options["transformer_options"])
    to["cond_or_uncond"] = list(chunks)
    to["sigmas"] = torch.full((x.shape[0],), sigma)
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=t, context=ctx, y=y, transformer_options=to)


def test_loaders_read_the_layouts(env):
    assert env.v11.model.spec.version == "v1.1" and env.v11.model.spec.tokens == 32
    assert env.v1.model.spec.version == "v1" and env.converted.model.spec.version == "v1"
    assert env.eva.model.image_size == 336 and env.eva.model.width == tiny_pulid.TINY_EVA["width"]
    with pytest.raises(FileNotFoundError, match="'missing.bin' not found in the 'pulid' folders.*guozinan/PuLID"):
        env.maps["PersonalizePuLIDLoader"]().load("missing.bin")


def test_encode_runs_the_face_pipeline(env):
    embeds, preview, info = encode(env)
    assert embeds.id_cond.shape == (1, 512 + tiny_pulid.TINY_EVA["projection"]) and embeds.pack == "antelopev2"
    assert [tuple(h.shape) for h in embeds.hidden] == [(1, 577, tiny_pulid.TINY_EVA["width"])] * 5
    assert torch.allclose(embeds.id_cond[:, 512:].norm(dim=1), torch.ones(1), atol=1e-5)
    assert preview.shape == (1, 512, 1024, 3) and "1 reference face" in info and "warning" not in info
    _, _, info = encode(env, analysis=env.buffalo)
    assert "warning: the faces come from buffalo_l" in info


def test_no_face_is_an_error_naming_the_image(env):
    image = torch.cat([face_image(), torch.zeros(1, 640, 640, 3)])
    with pytest.raises(ValueError, match="no face found in image 1 .*640, 576, 512, 448, 384, 320"):
        encode(env, image)


def apply(env, model, loaded, embeds, method="fidelity", weight=0.8, **kw):
    return env.maps["PersonalizePuLIDApply"]().apply(model, loaded, embeds, method, weight, 0.0, 1.0, **kw)[0]


def reference_difference(comfy, env, method, dtype, size):
    """``(ours - reference, ID effect)`` of one SDXL UNet call (CFG batch [uncond, cond]) on the ComfyUI host against
    the reference ID attention on the same weights converted to diffusers, in ``dtype`` at a ``size`` latent."""
    embeds = encode(env)[0]
    patched = apply(env, env.sdxl, env.v11, embeds, method)
    a2 = attn2(patched)
    assert len(a2) == 70 and {("middle", 0, i) for i in range(10)} <= set(a2)
    patch = a2[("input", 4, 0)].callback[0].patch
    assert patch.num_zero == {"fidelity": 20, "style": 16, "neutral": 0}[method]  # v1.1's app uses 20 for fidelity
    cond, uncond = (t.to(dtype) for t in patch.tokens[False])

    g = torch.Generator().manual_seed(3)
    tiny = comfy.tiny
    x, t = torch.randn(2, 4, size, size, generator=g).to(dtype), torch.tensor([400.0, 400.0], dtype=dtype)
    ctx = torch.randn(2, 5, tiny.TINY_UNETS["sdxl"]["context_dim"], generator=g).to(dtype)
    pooled = torch.randn(2, tiny.TINY_UNETS["sdxl"]["pooled_dim"], generator=g).to(dtype)
    time_ids = tiny.sdxl_time_ids(size * 8, size * 8)
    y = tiny.comfy_sdxl_y(pooled, time_ids).to(dtype)
    unet = tiny.to_diffusers_unet(env.sdxl, dtype=dtype).eval()
    dm, model = patched.model.diffusion_model, env.v11.model
    with torch.inference_mode():  # the loaded weights are inference tensors; float32 -> float64 -> float32 is exact
        dm.to(dtype), model.to(dtype)
        try:
            patch.drop_caches()
            ours = unet_call(patched, x, t, ctx, y, [1, 0])
            plain = unet_call(env.sdxl, x, t, ctx, y, [1, 0])
        finally:
            dm.float(), model.float()
            patch.drop_caches()
    layers = copy.deepcopy(model.id_layers).to(dtype)
    ref = copy.deepcopy(unet)
    names = [n for n in ref.attn_processors if n.endswith("attn2.processor")]
    procs = dict(ref.attn_processors)
    for k, n in enumerate(names):
        procs[n] = RefIDProcessor(layers[k], torch.cat([uncond, cond]), 0.8, patch.projection, patch.num_zero)
    ref.set_attn_processor(procs)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([time_ids] * 2, dtype=dtype)}
    with torch.no_grad():
        ref_out = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        ref_plain = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
    assert (plain - ref_plain).abs().max() <= TOL * max(1.0, ref_plain.abs().max())
    assert (ours - plain).abs().max() > 1e-3
    return ((ours - plain) - (ref_out - ref_plain)).abs().max().item(), (ref_out - ref_plain).abs().max().item()


@pytest.mark.parametrize("method", ["fidelity", "style", "neutral"])
def test_one_unet_call_equals_the_reference(comfy, env, method):
    """fp32 at a 32x32 latent (8x8 tokens on the deepest level)."""
    diff, effect = reference_difference(comfy, env, method, torch.float32, 32)
    assert diff <= TOL * max(1.0, effect)


@pytest.mark.parametrize("method", ["fidelity", "style"])
def test_the_projections_equal_the_reference_to_rounding(comfy, env, method):
    """float64: the same computation to 1e-10. (In float32 on a latent as small as 8x8, whose deepest level has 4
    tokens, the projections' sums over the token axis amplify the hosts' different attention rounding to ~3e-5.)"""
    diff, effect = reference_difference(comfy, env, method, torch.float64, 8)
    assert diff <= 1e-10 * max(1.0, effect)


def test_several_references_and_advanced(env):
    two = encode(env, face_image(2))[0]
    one = encode(env)[0]
    p1 = attn2(apply(env, env.sdxl, env.v1, two))[("input", 4, 0)].callback[0].patch
    assert p1.tokens[False][0].shape[1] == 15  # v1: 10 + the second image's first 5
    mixed = attn2(apply(env, env.sdxl, env.v1, two, id_mix=True))[("input", 4, 0)].callback[0].patch
    assert mixed.tokens[False][0].shape[1] == 20
    p11 = attn2(apply(env, env.sdxl, env.v11, two))[("input", 4, 0)].callback[0].patch
    assert p11.tokens[False][0].shape[1] == 32  # v1.1: one IDFormer call
    adv = env.maps["PersonalizePuLIDApplyAdvanced"]().apply(env.sdxl, env.v11, one, "ortho", 3, 0.5, 0.0, 1.0)[0]
    patch = attn2(adv)[("input", 4, 0)].callback[0].patch
    assert (patch.projection, patch.num_zero, patch.weight) == ("ortho", 3, 0.5)
    assert apply(env, env.sdxl, env.v11, one, weight=0.0) is env.sdxl


def test_refuses_what_does_not_fit(env):
    embeds = encode(env)[0]
    with pytest.raises(ValueError, match="PuLID model is for SDXL.*model is SD1.5"):
        apply(env, env.sd15, env.v11, embeds)
    other = type(embeds)(torch.zeros(1, 1280), [torch.zeros(1, 577, 1024)] * 5)
    with pytest.raises(ValueError, match="id_cond width 1280"):
        apply(env, env.sdxl, env.v11, other)
    with pytest.raises(ValueError, match="after end_at"):
        env.maps["PersonalizePuLIDApply"]().apply(env.sdxl, env.v11, embeds, "fidelity", 0.8, 0.9, 0.1)
    with pytest.raises(ValueError, match="attn_mask holds"):
        apply(env, env.sdxl, env.v11, embeds, attn_mask=torch.full((1, 8, 8), float("nan")))


def test_masks_and_ipadapter_coexist(comfy, env):
    embeds = encode(env)[0]
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load("pulid_test_base_sdxl.safetensors")[0]
    emb = comfy.module("models.ipadapter").IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    with_pulid = apply(env, env.sdxl, env.v11, embeds, attn_mask=torch.ones(1, 16, 16))
    both = env.maps["PersonalizeIPAdapterApply"]().apply(with_pulid, ipa, 0.8, "linear", 0.0, 1.0, "concat", "V only",
                                                          embeds=emb)[0]
    site = attn2(both)[("input", 4, 0)]
    kinds = [type(cb.patch).__name__ for cb in site.callback]
    assert kinds == ["PuLIDPatch", "IPAdapterPatch"] and len(attn2(with_pulid)[("input", 4, 0)].callback) == 1
    assert {m.model for m in site.models()} == {env.v11.model, ipa.model}  # both load with the UNet
    g = torch.Generator().manual_seed(4)
    tiny = comfy.tiny
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([400.0, 400.0])
    ctx = torch.randn(2, 5, tiny.TINY_UNETS["sdxl"]["context_dim"], generator=g)
    y = tiny.comfy_sdxl_y(torch.randn(2, tiny.TINY_UNETS["sdxl"]["pooled_dim"], generator=g), tiny.sdxl_time_ids(64, 64))
    outs = [unet_call(m, x, t, ctx, y, [1, 0]) for m in (env.sdxl, with_pulid, both)]
    assert (outs[1] - outs[0]).abs().max() > 1e-3 and (outs[2] - outs[1]).abs().max() > 1e-3


def test_embeds_save_and_load(env):
    embeds = encode(env)[0]
    saved = [env.maps["PersonalizePuLIDSaveEmbeds"]().save(embeds, "pulid_test/id")["ui"]["embeds"][0] for _ in range(2)]
    assert saved[0]["filename"] != saved[1]["filename"]
    name = f"{saved[0]['subfolder']}/{saved[0]['filename']} [output]"
    assert name in env.maps["PersonalizePuLIDLoadEmbeds"].INPUT_TYPES()["required"]["embeds_file"][0]
    back = env.maps["PersonalizePuLIDLoadEmbeds"]().load(name)[0]
    assert torch.equal(back.id_cond, embeds.id_cond) and back.pack == "antelopev2"
