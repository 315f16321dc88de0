"""Tier 2: the IP-Adapter nodes inside a real ComfyUI (loader, ModelPatcher, samplers, executor).

The ComfyUI host is compared with diffusers' own IP-Adapter on the same UNet weights (converted with
ComfyUI's key map) and the same adapter file: one model call, fp32, 1e-5.
"""
import os
import subprocess
import sys
import types

import pytest
import tiny_adapters
import torch

TOL = 1e-5
OPTIONAL_DEPS = ("onnxruntime", "insightface", "timm", "facexlib")


@pytest.fixture(scope="module")
def pack(comfy):
    maps = comfy.load_pack()
    ns = types.SimpleNamespace(maps=maps, folders=comfy.module("nodes.comfy.folders"), sites=comfy.module("nodes.comfy.sites"),
                               ipa=comfy.module("models.ipadapter"), nodes=comfy.module("nodes.ipadapter"))
    ipa_dir = os.path.join(comfy.models_dir, "ipadapter")
    os.makedirs(ipa_dir, exist_ok=True)
    for layout in ("sd15", "sdxl"):
        for fam in ("base", "plus", "full-face"):
            tiny_adapters.write_tiny_adapter(os.path.join(ipa_dir, f"tiny_{fam}_{layout}.safetensors"), fam, layout, "vit-h", seed=7)
        tiny_adapters.write_tiny_adapter(os.path.join(ipa_dir, f"tiny_base_{layout}_bigG.bin"), "base", layout, "vit-bigG", seed=8)
        for fam in ("faceid", "faceid-portrait", "faceid-plus", "faceid-portrait-unnorm"):
            tiny_adapters.write_tiny_adapter(os.path.join(ipa_dir, f"tiny_{fam}_{layout}.bin"), fam, layout, "vit-h", seed=9)
    # same file under the public v2 naming: v1 and v2 differ only in how they are used
    import shutil
    shutil.copy(os.path.join(ipa_dir, "tiny_faceid-plus_sd15.bin"), os.path.join(ipa_dir, "tiny_faceid-plusv2_sd15.bin"))
    return ns


@pytest.fixture(scope="module")
def core(comfy):
    import nodes
    return nodes.NODE_CLASS_MAPPINGS


def checkpoint(core, layout):
    name = os.path.basename({"sd15": "tiny_sd15.safetensors", "sdxl": "tiny_sdxl.safetensors"}[layout])
    return core["CheckpointLoaderSimple"]().load_checkpoint(name)


def clip_vision(comfy, core, kind="vit-h"):
    return core["CLIPVisionLoader"]().load_clip(os.path.basename(comfy.files[f"clip_vision_{kind}"]))[0]


def random_embeds(pack, spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, spec.clip_dim) if spec.feature == "image_embeds" else (1, 257, spec.clip_dim)
    return pack.ipa.IPAEmbeds(torch.randn(*shape, generator=g), torch.zeros(*shape), spec.feature)


def apply(pack, model, file, weight=0.8, weight_type="linear", start=0.0, end=1.0, combine="concat", scaling="V only", **kw):
    ipa = pack.maps["PersonalizeIPAdapterLoader"]().load(file)[0]
    if kw.pop("auto_embeds", True) and weight != 0 and not ({"image", "embeds"} & set(kw)):
        kw["embeds"] = random_embeds(pack, ipa.spec)
    return pack.maps["PersonalizeIPAdapterApply"]().apply(model, ipa, weight, weight_type, start, end, combine, scaling, **kw)[0], ipa


def attn2(model):
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})


def unet_call(model, x, t, ctx, chunks, y=None, sigma=1.0):
    to = dict(model.model_options["transformer_options"])
    to["cond_or_uncond"] = list(chunks)
    to["sigmas"] = torch.full((x.shape[0],), sigma)
    with torch.no_grad():
        return model.model.diffusion_model(x, timesteps=t, context=ctx, y=y, transformer_options=to)


# ---------------------------------------------------------------------------------------------------------------


def test_pack_loads_without_optional_deps_and_imports_nothing_heavy(comfy):
    """ComfyUI's own loader, in a fresh process where onnxruntime/insightface/timm/facexlib cannot be imported."""
    code = f"""
import sys, os, json
for m in {OPTIONAL_DEPS!r}:
    sys.modules[m] = None  # import raises ImportError
sys.path.insert(0, os.path.join({comfy.repo_root!r}, "devtools"))
import comfy_host
comfy_host.bootstrap(os.environ["COMFYUI_PATH"], load_extras=False)
before = set(sys.modules)
maps = comfy_host.load_pack({comfy.repo_root!r})
new = sorted(m for m in set(sys.modules) - before if "Personalize" not in m)
print(json.dumps({{"nodes": sorted(maps), "new": new}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"PersonalizeIPAdapterLoader", "PersonalizeIPAdapterApply", "PersonalizeIPAdapterEncode"} <= set(res["nodes"])
    heavy = [m for m in res["new"] if m.split(".")[0] in ("diffusers", "timm", "onnxruntime", "insightface", "cv2")]
    assert not heavy, heavy


def test_node_conventions(pack):
    import folder_paths
    for node_id, cls in pack.maps.items():
        assert node_id.startswith("Personalize")
        assert cls.CATEGORY.startswith("personalize/")
        assert len(cls.DESCRIPTION) > 20
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    for name in ("ipadapter", "pulid", "e4t", "insightface", "eva_clip", "face_parsing"):
        assert name in folder_paths.folder_names_and_paths



def _node_texts(cls):
    yield "DESCRIPTION", cls.DESCRIPTION
    for i, t in enumerate(getattr(cls, "OUTPUT_TOOLTIPS", ())):
        yield f"output {i}", t
    for group in cls.INPUT_TYPES().values():
        for name, spec in group.items():
            yield name, spec[1].get("tooltip", "")


def test_node_texts_render_in_markdown_and_name_nodes_that_exist(pack):
    """The frontend renders descriptions as Markdown (a <name> placeholder would vanish as an unknown HTML tag), and
    every node a text names in quotes exists (the pack's or ComfyUI's own, by display name)."""
    import re

    import nodes
    names = set(nodes.NODE_DISPLAY_NAME_MAPPINGS.values()) | set(nodes.NODE_CLASS_MAPPINGS)
    names |= {n.removesuffix(" (Personalize)") for n in names}
    for node_id, cls in pack.maps.items():
        for where, text in _node_texts(cls):
            tag = re.search(r"<[A-Za-z_/][^>]*>", text)
            assert tag is None, f"{node_id} {where}: {tag.group()} vanishes in Markdown; write {{name}} instead"
            for quoted in re.findall(r"'([A-Z][^']+)'", text):
                assert quoted in names, f"{node_id} {where} names a node '{quoted}' that does not exist"

def test_register_keeps_extra_model_paths(pack, tmp_path):
    import folder_paths
    folder_paths.add_model_folder_path("pulid", str(tmp_path))
    pack.folders.register_model_folders()
    paths = folder_paths.folder_names_and_paths["pulid"][0]
    assert str(tmp_path) in paths and os.path.join(folder_paths.models_dir, "pulid") in paths


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
@pytest.mark.parametrize("family", ["base", "plus", "full-face"])
def test_matches_diffusers_reference(comfy, pack, core, layout, family):
    """One UNet call on the ComfyUI host vs diffusers' IP-Adapter on the same weights (CFG batch [uncond, cond])."""
    model = checkpoint(core, layout)[0]
    file = f"tiny_{family}_{layout}.safetensors"
    ipa = pack.maps["PersonalizeIPAdapterLoader"]().load(file)[0]
    spec = ipa.spec
    g = torch.Generator().manual_seed(3)
    if spec.feature == "image_embeds":
        cond, uncond = torch.randn(1, spec.clip_dim, generator=g), torch.zeros(1, spec.clip_dim)
    else:
        cond, uncond = torch.randn(1, 257, spec.clip_dim, generator=g), torch.randn(1, 257, spec.clip_dim, generator=g)
    embeds = pack.ipa.IPAEmbeds(cond, uncond, spec.feature)
    patched = pack.maps["PersonalizeIPAdapterApply"]().apply(model, ipa, 0.6, "linear", 0.0, 1.0, "concat", "V only", embeds=embeds)[0]
    assert len(attn2(patched)) == (16 if layout == "sd15" else 70)

    ctx_dim = comfy.tiny.TINY_UNETS[layout]["context_dim"]
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 5, ctx_dim, generator=g)
    t = torch.tensor([400.0, 400.0])
    y = added = None
    if layout == "sdxl":
        pooled = torch.randn(2, comfy.tiny.TINY_UNETS["sdxl"]["pooled_dim"], generator=g)
        time_ids = comfy.tiny.sdxl_time_ids(64, 64)
        y = comfy.tiny.comfy_sdxl_y(pooled, time_ids)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([time_ids] * 2, dtype=torch.float32)}
    ours = unet_call(patched, x, t, ctx, [1, 0], y)
    plain = unet_call(model, x, t, ctx, [1, 0], y)

    unet = comfy.tiny.to_diffusers_unet(model).eval()
    from safetensors.torch import load_file
    flat = load_file(os.path.join(comfy.models_dir, "ipadapter", file))
    sd = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")} for part in ("image_proj", "ip_adapter")}
    with torch.no_grad():
        ref_plain = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=dict(added or {})).sample
        unet._load_ip_adapter_weights([sd])
        for p in unet.attn_processors.values():
            if hasattr(p, "scale"):
                p.scale = [0.6]
        image_embeds = torch.cat([uncond, cond])[:, None]  # [batch, num_images, ...]
        ref = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={**(added or {}), "image_embeds": [image_embeds]}).sample

    assert (plain - ref_plain).abs().max().item() <= TOL * max(1.0, ref_plain.abs().max().item())
    effect = ours - plain
    assert effect.abs().max().item() > 1e-3
    assert (effect - (ref - ref_plain)).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


def test_sites_keys_and_middle_block(pack, core):
    sd15 = apply(pack, checkpoint(core, "sd15")[0], "tiny_base_sd15.safetensors")[0]
    keys = set(attn2(sd15))
    assert ("middle", 0) in keys and ("middle", 1) not in keys and len(keys) == 16
    assert all(len(k) == 2 for k in keys)  # single-block transformers: (block, id), as other SD1.5 packs
    sdxl = apply(pack, checkpoint(core, "sdxl")[0], "tiny_base_sdxl.safetensors")[0]
    keys = set(attn2(sdxl))
    assert len(keys) == 70 and {("middle", 0, i) for i in range(10)} <= keys


class ForeignAttn2Replace:
    """A protocol double of the popular packs' Attn2Replace (callback/kwargs lists, .add, sigma gating)."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention
        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = float(extra_options["sigmas"][0]) if "sigmas" in extra_options else 999999999.9
        for cb, kw in zip(self.callback, self.kwargs):
            if kw["sigma_end"] <= sigma <= kw["sigma_start"]:
                out = out + cb(out, q, k, v, extra_options, **kw)
        return out


class Calls(list):
    """Records the sites a foreign callback ran at; shared (not copied) when ModelPatcher.clone() deep-copies."""

    def __deepcopy__(self, memo):
        return self


def _foreign_cb(out, q, k, v, extra_options, **kwargs):
    kwargs["calls"].append(extra_options["block"])
    return torch.zeros_like(out)


def test_coexists_with_other_packs(pack, core):
    model = checkpoint(core, "sd15")[0].clone()
    calls = Calls()
    a2 = model.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("attn2", {})
    a2[("input", 1)] = ForeignAttn2Replace(_foreign_cb, sigma_start=1e9, sigma_end=0.0, calls=calls)  # theirs first
    a2[("input", 2)] = lambda q, k, v, eo: torch.zeros_like(q)  # a plain replace function
    patched, _ = apply(pack, model, "tiny_base_sd15.safetensors")
    site = attn2(patched)[("input", 1)]
    assert isinstance(site, ForeignAttn2Replace) and len(site.callback) == 2  # we joined theirs
    assert len(attn2(model)[("input", 1)].callback) == 1  # the input model is untouched
    assert isinstance(attn2(patched)[("input", 2)], pack.sites.AttentionSite)
    # then another pack adds to ours, as they do with .add
    ours = attn2(patched)[("output", 3)]
    theirs = patched.clone()
    attn2(theirs)[("output", 3)].add(_foreign_cb, sigma_start=1e9, sigma_end=0.0, calls=calls)
    assert len(ours.callback) == 1 and len(attn2(theirs)[("output", 3)].callback) == 2
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 5, 48)
    out = unet_call(theirs, x, t, ctx, [1, 0])
    assert ("input", 1) in calls and ("output", 3) in calls
    assert (out - unet_call(model, x, t, ctx, [1, 0])).abs().max() > 1e-3
    # the plain replace function is the base attention of our site: its output (zeros) plus our delta, exactly
    site = attn2(patched)[("input", 2)]
    q = torch.randn(2, 64, 32)
    eo = {"n_heads": 8, "cond_or_uncond": [1, 0], "original_shape": [2, 4, 8, 8], "sigmas": torch.tensor([1.0, 1.0])}
    delta = site.callback[0](None, q, None, None, eo)
    assert delta.abs().max() > 0 and torch.equal(site(q, q, q, eo), delta.to(q.dtype))


def test_clone_shares_weights_and_isolates_additions(pack, core):
    patched, ipa = apply(pack, checkpoint(core, "sd15")[0], "tiny_plus_sd15.safetensors")
    clone = patched.clone()
    a, b = attn2(patched)[("input", 1)], attn2(clone)[("input", 1)]
    assert a is not b and a.callback[0] is b.callback[0]
    assert a.callback[0].patch.adapter is ipa.model
    assert clone.get_additional_models()[0].model is ipa.model  # weights shared, not copied
    again, _ = apply(pack, clone, "tiny_base_sd15.safetensors")
    assert len(attn2(again)[("input", 1)].callback) == 2 and len(a.callback) == 1 and len(b.callback) == 1


def test_cfg1_and_batch_layouts(pack, core):
    model = checkpoint(core, "sd15")[0]
    patched, _ = apply(pack, model, "tiny_base_sd15.safetensors",
                       embeds=pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds"))
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 5, 48, generator=g)
    t = torch.tensor([300.0])
    cond_only = unet_call(patched, x, t, ctx, [0])  # cfg == 1: ComfyUI sends the cond chunk alone
    both = unet_call(patched, torch.cat([x, x]), torch.cat([t, t]), torch.cat([ctx, ctx]), [1, 0])
    assert (both[1:] - cond_only).abs().max() <= TOL
    assert (both[:1] - cond_only).abs().max() > 1e-3  # the uncond row used the uncond image tokens


def test_sigma_window(pack, core):
    model = checkpoint(core, "sd15")[0]
    patched, _ = apply(pack, model, "tiny_base_sd15.safetensors", start=0.5, end=1.0,
                       embeds=pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds"))
    ms = model.get_model_object("model_sampling")
    mid = float(ms.percent_to_sigma(0.5))
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 48), torch.tensor([500.0, 500.0])
    early = unet_call(patched, x, t, ctx, [1, 0], sigma=mid * 2)
    late = unet_call(patched, x, t, ctx, [1, 0], sigma=mid / 2)
    assert (early - unet_call(model, x, t, ctx, [1, 0])).abs().max() == 0
    assert (late - unet_call(model, x, t, ctx, [1, 0])).abs().max() > 1e-3


def test_sigma_is_read_once_per_model_call(pack, core, monkeypatch):
    patched, _ = apply(pack, checkpoint(core, "sd15")[0], "tiny_base_sd15.safetensors",
                       embeds=pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds"))
    reads = []
    real = torch.Tensor.__float__
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append(1) or real(self))
    unet_call(patched, torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 5, 48), [1, 0])
    assert len(reads) == 1


def test_weight_zero_is_a_free_noop(pack, core):
    model = checkpoint(core, "sd15")[0]
    out, _ = apply(pack, model, "tiny_base_sd15.safetensors", weight=0.0)  # no image needed, nothing encoded
    assert out is model


def test_bad_inputs(comfy, pack, core):
    sd15 = checkpoint(core, "sd15")[0]
    emb = pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    with pytest.raises(ValueError, match=r"IP-Adapter is for SDXL.*model is SD1.5"):
        apply(pack, sd15, "tiny_base_sdxl.safetensors", embeds=emb)
    with pytest.raises(ValueError, match=r"CLIP vision/adapter mismatch.*ViT|width"):
        apply(pack, sd15, "tiny_base_sd15.safetensors", image=torch.rand(1, 64, 64, 3), clip_vision=clip_vision(comfy, core, "vit-bigG"))
    with pytest.raises(ValueError, match="empty"):
        apply(pack, sd15, "tiny_base_sd15.safetensors", image=torch.rand(0, 64, 64, 3), clip_vision=clip_vision(comfy, core))
    with pytest.raises(ValueError, match="needs a reference"):
        apply(pack, sd15, "tiny_base_sd15.safetensors", auto_embeds=False)
    with pytest.raises(ValueError, match="needs penultimate"):
        apply(pack, sd15, "tiny_plus_sd15.safetensors", embeds=emb)
    with pytest.raises(ValueError, match="attn_mask"):
        apply(pack, sd15, "tiny_base_sd15.safetensors", embeds=emb, attn_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match="after end_at"):
        apply(pack, sd15, "tiny_base_sd15.safetensors", embeds=emb, start=0.8, end=0.2)
    with pytest.raises(FileNotFoundError, match="not found in the 'ipadapter' folders"):
        pack.maps["PersonalizeIPAdapterLoader"]().load("missing.safetensors")
    assert attn2(sd15) == {}  # nothing was changed on the input model


def test_encode_uncond_and_embeds_roundtrip(comfy, pack, core):
    cv = clip_vision(comfy, core)
    img = torch.rand(2, 80, 96, 3)
    base = pack.maps["PersonalizeIPAdapterLoader"]().load("tiny_base_sd15.safetensors")[0]
    plus = pack.maps["PersonalizeIPAdapterLoader"]().load("tiny_plus_sd15.safetensors")[0]
    e_base = pack.maps["PersonalizeIPAdapterEncode"]().encode(base, cv, img)[0]
    assert e_base.cond.shape == (2, 24) and torch.equal(e_base.uncond, torch.zeros(1, 24))
    e_plus = pack.maps["PersonalizeIPAdapterEncode"]().encode(plus, cv, img)[0]
    with torch.no_grad():
        blank = cv.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1]
    assert e_plus.cond.shape == (2, 257, 40) and torch.allclose(e_plus.uncond, blank.float(), atol=1e-6)
    neg = pack.maps["PersonalizeIPAdapterEncode"]().encode(plus, cv, img, image_negative=torch.zeros(1, 64, 64, 3))[0]
    assert not torch.allclose(neg.uncond, e_plus.uncond)
    res = pack.maps["PersonalizeIPAdapterSaveEmbeds"]().save(e_plus, "tests/embeds")
    saved = res["ui"]["embeds"][0]
    name = f"{saved['subfolder']}/{saved['filename']} [output]"
    assert name in pack.maps["PersonalizeIPAdapterLoadEmbeds"].INPUT_TYPES()["required"]["embeds_file"][0]
    loaded = pack.maps["PersonalizeIPAdapterLoadEmbeds"]().load(name)[0]
    assert torch.equal(loaded.cond, e_plus.cond) and loaded.feature == "penultimate"


def test_mask_regional_and_any_size(pack, core):
    model = checkpoint(core, "sd15")[0]
    emb = pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    mask = torch.zeros(37, 53)
    mask[:, :26] = 1.0
    patched, _ = apply(pack, model, "tiny_base_sd15.safetensors", embeds=emb, attn_mask=mask)
    site = attn2(patched)[("input", 1)]
    q = torch.randn(2, 6 * 10, 32)  # latent 6x10 (not square)
    eo = {"n_heads": 8, "cond_or_uncond": [1, 0], "original_shape": [2, 4, 6, 10], "sigmas": torch.tensor([1.0, 1.0])}
    delta = site.callback[0](None, q, None, None, eo).reshape(2, 6, 10, -1)
    assert delta[:, :, 6:].abs().max() == 0 and delta[:, :, :4].abs().min() > 0
    # a whole sampling run on a non-square latent with the odd-sized mask works on every level
    pos = [[torch.randn(1, 5, 48), {}]]
    lat = {"samples": torch.zeros(1, 4, 12, 20)}
    out = core["KSampler"]().sample(patched, 0, 2, 5.0, "euler", "normal", pos, pos, lat)[0]["samples"]
    assert torch.isfinite(out).all()
    batch2 = apply(pack, model, "tiny_base_sd15.safetensors", embeds=emb, attn_mask=torch.ones(3, 8, 8))[0]
    with pytest.raises(Exception, match="frames"):
        core["KSampler"]().sample(batch2, 0, 1, 5.0, "euler", "normal", pos, pos, {"samples": torch.zeros(2, 4, 8, 8)})


def test_adapter_weights_follow_model_management(pack, core):
    import comfy.model_management as mm
    model = checkpoint(core, "sd15")[0]
    patched, ipa = apply(pack, model, "tiny_plus_sd15.safetensors",
                         embeds=pack.ipa.IPAEmbeds(torch.randn(1, 257, 40), torch.zeros(1, 257, 40), "penultimate"))
    pos = [[torch.randn(1, 5, 48), {}]]
    core["KSampler"]().sample(patched, 0, 1, 5.0, "euler", "normal", pos, pos, {"samples": torch.zeros(1, 4, 8, 8)})
    assert any(lm.model.model is ipa.model for lm in mm.current_loaded_models)


def test_style_and_composition_sdxl(pack, core):
    model = checkpoint(core, "sdxl")[0]
    e1 = pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    e2 = pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    patched, _ = apply(pack, model, "tiny_base_sdxl.safetensors", weight_type="style and composition", embeds=e1,
                       composition_embeds=e2, composition_weight=0.5)
    a2 = attn2(patched)
    # style: transformer 6 = output block 1 (10 sites); composition: transformer 3 = input block 8 (10 sites)
    assert set(a2) == {("output", 1, i) for i in range(10)} | {("input", 8, i) for i in range(10)}
    patch = a2[("input", 8, 0)].callback[0].patch
    assert patch.site_weights[a2[("input", 8, 0)].callback[0].index] == (0.5, True)
    with pytest.raises(ValueError, match="composition"):
        apply(pack, model, "tiny_base_sdxl.safetensors", weight_type="style and composition", embeds=e1, auto_embeds=False)


# ---------------------------------------------------------------------------------------------------------------
# FaceID family


def faces(n=1, seed=0, crop=224):
    """What 'Face Embed (Personalize)' hands over (the fields the FaceID node reads)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, 512, generator=g) * 20
    return types.SimpleNamespace(embedding=raw, normed=torch.nn.functional.normalize(raw, dim=-1),
                                 crops=torch.rand(n, crop, crop, 3, generator=g))


def faceid(pack, model, file, **kw):
    ipa = pack.maps["PersonalizeIPAdapterLoader"]().load(file)[0]
    args = dict(weight=0.8, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat", embeds_scaling="V only")
    args.update(kw)
    face_embeds = args.pop("face_embeds", faces())
    return pack.maps["PersonalizeIPAdapterFaceIDApply"]().apply(model, ipa, face_embeds, **args), ipa


def _sample(core, model, layout="sd15"):
    ctx = torch.randn(1, 5, 48 if layout == "sd15" else 120, generator=torch.Generator().manual_seed(1))
    pos = [[ctx, {"pooled_output": torch.zeros(1, 72)} if layout == "sdxl" else {}]]
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    return core["KSampler"]().sample(model, 0, 2, 5.0, "euler", "normal", pos, pos, lat)[0]["samples"]


@pytest.mark.parametrize("file", ["tiny_faceid_sd15.bin", "tiny_faceid-portrait_sd15.bin", "tiny_faceid-portrait-unnorm_sdxl.bin"])
def test_faceid_families_apply(pack, core, file):
    layout = "sdxl" if "sdxl" in file else "sd15"
    model = checkpoint(core, layout)[0]
    (patched, info), ipa = faceid(pack, model, file, face_embeds=faces(2))
    assert len(attn2(patched)) == (16 if layout == "sd15" else 70)
    assert ipa.spec.name in info
    assert (_sample(core, patched, layout) - _sample(core, model, layout)).abs().max() > 1e-3


def test_faceid_unnorm_uses_the_raw_embedding(pack, core):
    model = checkpoint(core, "sdxl")[0]
    f = faces()
    (a, _), _ = faceid(pack, model, "tiny_faceid-portrait-unnorm_sdxl.bin", face_embeds=f)
    scaled = types.SimpleNamespace(embedding=f.embedding * 2, normed=f.normed, crops=f.crops)
    (b, _), _ = faceid(pack, model, "tiny_faceid-portrait-unnorm_sdxl.bin", face_embeds=scaled)
    tok = lambda m: next(iter(attn2(m).values())).callback[0].patch.tokens[False][0]  # noqa: E731
    assert not torch.allclose(tok(a), tok(b))  # the raw (unnormalised) embedding reaches the projection
    (c, _), _ = faceid(pack, checkpoint(core, "sd15")[0], "tiny_faceid_sd15.bin", face_embeds=f)
    (d, _), _ = faceid(pack, checkpoint(core, "sd15")[0], "tiny_faceid_sd15.bin", face_embeds=scaled)
    assert torch.allclose(tok(c), tok(d))  # FaceID takes the normalised one


def test_faceid_plus_versions_and_clip(comfy, pack, core):
    model = checkpoint(core, "sd15")[0]
    cv = clip_vision(comfy, core)
    (v2, info2), _ = faceid(pack, model, "tiny_faceid-plusv2_sd15.bin", clip_vision=cv)
    assert "v2" in info2 and "file name" in info2
    (v1, info1), _ = faceid(pack, model, "tiny_faceid-plus_sd15.bin", clip_vision=cv)
    assert "FaceID Plus v1" in info1
    (forced, info_f), _ = faceid(pack, model, "tiny_faceid-plusv2_sd15.bin", clip_vision=cv, plus_version="v1")
    assert "FaceID Plus v1" in info_f and "file name" not in info_f
    tok = lambda m: attn2(m)[("input", 1)].callback[0].patch.tokens[False][0]  # noqa: E731
    assert torch.allclose(tok(v1), tok(forced)) and not torch.allclose(tok(v1), tok(v2))
    with pytest.raises(ValueError, match="needs clip_vision"):
        faceid(pack, model, "tiny_faceid-plus_sd15.bin")
    with pytest.raises(ValueError, match="CLIP vision/adapter mismatch"):
        faceid(pack, model, "tiny_faceid-plus_sd15.bin", clip_vision=clip_vision(comfy, core, "vit-bigG"))


def test_faceid_companion_lora(comfy, pack, core):
    from comfy.utils import save_torch_file
    model = checkpoint(core, "sd15")[0]
    g = torch.Generator().manual_seed(5)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_q"
    lora = {f"{key}.lora_down.weight": torch.randn(4, 32, generator=g), f"{key}.lora_up.weight": torch.randn(32, 4, generator=g)}
    os.makedirs(os.path.join(comfy.models_dir, "loras"), exist_ok=True)
    save_torch_file(lora, os.path.join(comfy.models_dir, "loras", "tiny_faceid_lora.safetensors"))
    (with_lora, info), _ = faceid(pack, model, "tiny_faceid_sd15.bin", lora_name="tiny_faceid_lora.safetensors", lora_strength=0.5)
    assert "LoRA tiny_faceid_lora.safetensors at 0.5" in info
    assert any(key in k for k in with_lora.patches)
    (without, info0), _ = faceid(pack, model, "tiny_faceid_sd15.bin")
    assert "no LoRA" in info0 and not without.patches


def test_faceid_wrong_node_and_empty(pack, core):
    model = checkpoint(core, "sd15")[0]
    with pytest.raises(ValueError, match="not FaceID"):
        faceid(pack, model, "tiny_base_sd15.safetensors")
    with pytest.raises(ValueError, match="Apply IP-Adapter FaceID"):
        apply(pack, model, "tiny_faceid_sd15.bin", embeds=pack.ipa.IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds"))
    with pytest.raises(ValueError, match="empty"):
        faceid(pack, model, "tiny_faceid_sd15.bin", face_embeds=types.SimpleNamespace(
            embedding=torch.zeros(0, 512), normed=torch.zeros(0, 512), crops=torch.zeros(0, 8, 8, 3)))
    (same, _), _ = faceid(pack, model, "tiny_faceid_sd15.bin", weight=0.0)
    assert same is model
