"""Tier 1: checkpoint families, safe loading, layer tables and the host-free patch math."""
import os
import pickle

import pytest
import tiny_adapters
import tiny_flux
import torch

from comfyui_personalize.models.attention import SiteCall, attention, ip_attention, token_grid
from comfyui_personalize.models.checkpoints import CheckpointError, load_file, split_prefixes
from comfyui_personalize.models.ipadapter import (
    FAMILIES,
    XLABS_PARTS,
    IPAdapterModel,
    IPAdapterPatch,
    IPAEmbeds,
    check_model,
    combine_features,
    detect_family,
    detect_xlabs,
    load_adapter,
    project_images,
)
from comfyui_personalize.models.layers import SD15_TRANSFORMERS, SDXL_TRANSFORMERS, layer_weights, sites_from_transformers

SD15_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]  # adapter order
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10


def meta(*shape):
    return torch.empty(*shape, device="meta")


def official_layers(widths, cross):
    sd = {}
    for k, w in enumerate(widths):
        sd[f"{2 * k + 1}.to_k_ip.weight"] = meta(w, cross)
        sd[f"{2 * k + 1}.to_v_ip.weight"] = meta(w, cross)
    return sd


def resampler(dim, emb, out, heads=None):
    inner = dim if heads is None else heads * 64
    sd = {"latents": meta(1, 16, dim), "proj_in.weight": meta(dim, emb), "proj_in.bias": meta(dim),
          "proj_out.weight": meta(out, dim), "proj_out.bias": meta(out), "norm_out.weight": meta(out), "norm_out.bias": meta(out)}
    for i in range(4):
        sd.update({f"layers.{i}.0.to_q.weight": meta(inner, dim), f"layers.{i}.0.to_kv.weight": meta(2 * inner, dim),
                   f"layers.{i}.0.to_out.weight": meta(dim, inner), f"layers.{i}.1.1.weight": meta(4 * dim, dim)})
    return sd


# Shapes of the public files (h94/IP-Adapter models/ and sdxl_models/, h94/IP-Adapter-FaceID).
OFFICIAL = {
    "ip-adapter_sd15": ({"proj.weight": meta(3072, 1024), "norm.weight": meta(768)}, SD15_WIDTHS, 768, ("base", "sd15", 1024, 4)),
    "ip-adapter_sd15_vit-G": ({"proj.weight": meta(3072, 1280), "norm.weight": meta(768)}, SD15_WIDTHS, 768, ("base", "sd15", 1280, 4)),
    "ip-adapter-plus_sd15": (resampler(768, 1280, 768), SD15_WIDTHS, 768, ("plus", "sd15", 1280, 16)),
    "ip-adapter-full-face_sd15": ({"proj.0.weight": meta(1280, 1280), "proj.2.weight": meta(768, 1280), "proj.3.weight": meta(768)},
                                  SD15_WIDTHS, 768, ("full-face", "sd15", 1280, 0)),
    "ip-adapter_sdxl": ({"proj.weight": meta(8192, 1280), "norm.weight": meta(2048)}, SDXL_WIDTHS, 2048, ("base", "sdxl", 1280, 4)),
    "ip-adapter_sdxl_vit-h": ({"proj.weight": meta(8192, 1024), "norm.weight": meta(2048)}, SDXL_WIDTHS, 2048, ("base", "sdxl", 1024, 4)),
    "ip-adapter-plus_sdxl_vit-h": (resampler(1280, 1280, 2048, heads=20), SDXL_WIDTHS, 2048, ("plus", "sdxl", 1280, 16)),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_detects_official_layouts(name):
    proj, widths, cross, (family, layout, clip_dim, tokens) = OFFICIAL[name]
    spec = detect_family(proj, official_layers(widths, cross))
    assert (spec.family, spec.layout, spec.clip_dim, spec.tokens, spec.cross_dim) == (family, layout, clip_dim, tokens, cross)
    assert spec.widths == tuple(widths)
    if family == "plus":
        assert spec.proj_config["heads"] == (12 if layout == "sd15" else 20)


def test_check_model_pairs_adapters_with_models():
    """The pairing check is host-free: it takes what a host found in its UNet (transformers, sites, context width)."""
    sd15 = detect_family(OFFICIAL["ip-adapter_sd15"][0], official_layers(SD15_WIDTHS, 768))
    sdxl = detect_family(OFFICIAL["ip-adapter_sdxl"][0], official_layers(SDXL_WIDTHS, 2048))
    t15 = list(SD15_TRANSFORMERS)
    # one width per transformer in execution order (SD15_WIDTHS is in adapter order, the middle block last)
    by_transformer = [SD15_WIDTHS[s.adapter_index] for s in sites_from_transformers(t15)]
    sites15 = sites_from_transformers(t15, by_transformer)
    check_model(sd15, t15, sites15, 768)
    with pytest.raises(ValueError, match=r"for SDXL \(70 layers\) but the model is SD1.5"):
        check_model(sdxl, t15, sites15, 768)
    with pytest.raises(ValueError, match="takes 1024 and has"):  # an SD2.x UNet: same layout, other context width
        check_model(sd15, t15, sites15, 1024)
    with pytest.raises(ValueError, match="a UNet with 3 cross-attention layers"):
        check_model(sd15, t15[:3], sites15[:3], 768)


def test_every_family_is_declared_once_and_detected():
    """Detection only names registered families, and each entry is complete."""
    seen = {detect_family(p, official_layers(w, c)).family for p, w, c, _ in OFFICIAL.values()}
    seen |= {detect_family(p, layers).family for p, layers, _ in FACEID.values()}
    xlabs = split_prefixes(tiny_flux.xlabs_state_dict(16), XLABS_PARTS)
    seen.add(detect_xlabs(xlabs["image_proj"], xlabs["blocks"]).family)
    assert seen == set(FAMILIES)
    for name, fam in FAMILIES.items():
        assert fam.name == name and fam.description.startswith("IP-Adapter")
        assert fam.is_faceid == (fam.face_embedding is not None)
        assert fam.clip_feature in ("image_embeds", "penultimate", None)
        assert not fam.clip_of_face_crop or (fam.is_faceid and fam.clip_feature == "penultimate")


def faceid_mlp(tokens, cross):
    return {"proj.0.weight": meta(1024, 512), "proj.0.bias": meta(1024), "proj.2.weight": meta(tokens * cross, 1024),
            "proj.2.bias": meta(tokens * cross), "norm.weight": meta(cross), "norm.bias": meta(cross)}


def faceid_plus(cross):
    sd = faceid_mlp(4, cross)
    sd.update({"perceiver_resampler." + k: v for k, v in resampler(cross, 1280, cross).items() if k != "latents"})
    return sd


def with_lora(layers):
    layers = dict(layers)
    layers["0.to_q_lora.down.weight"] = meta(128, 320)
    layers["1.to_k_lora.up.weight"] = meta(320, 128)
    return layers


# (image_proj, ip_adapter) of the public FaceID files (h94/IP-Adapter-FaceID) -> (family, tokens, clip_dim, heads)
FACEID = {
    "ip-adapter-faceid_sd15": (faceid_mlp(4, 768), with_lora(official_layers(SD15_WIDTHS, 768)), ("faceid", 4, 0, None, True)),
    "ip-adapter-faceid-portrait-v11_sd15": (faceid_mlp(16, 768), official_layers(SD15_WIDTHS, 768),
                                            ("faceid-portrait", 16, 0, None, False)),
    "ip-adapter-faceid_sdxl": (faceid_mlp(4, 2048), with_lora(official_layers(SDXL_WIDTHS, 2048)), ("faceid", 4, 0, None, True)),
    "ip-adapter-faceid-plusv2_sd15": (faceid_plus(768), with_lora(official_layers(SD15_WIDTHS, 768)), ("faceid-plus", 4, 1280, 12, True)),
    "ip-adapter-faceid-plusv2_sdxl": (faceid_plus(2048), with_lora(official_layers(SDXL_WIDTHS, 2048)), ("faceid-plus", 4, 1280, 32, True)),
    "ip-adapter-faceid-portrait_sdxl_unnorm": (resampler(1280, 512, 2048, heads=20), official_layers(SDXL_WIDTHS, 2048),
                                               ("faceid-portrait-unnorm", 16, 0, 20, False)),
}


@pytest.mark.parametrize("name", sorted(FACEID))
def test_detects_faceid_layouts(name):
    proj, layers, (family, tokens, clip_dim, heads, lora) = FACEID[name]
    spec = detect_family(proj, layers)
    assert (spec.family, spec.tokens, spec.clip_dim, spec.has_lora, spec.is_faceid) == (family, tokens, clip_dim, lora, True)
    assert spec.id_dim == 512
    if heads:
        assert spec.proj_config["heads"] == heads
    if "portrait-v11" in name:
        assert "Portrait" in spec.describe()


def test_wrong_layer_count_and_gaps():
    proj = {"proj.weight": meta(3072, 1024), "norm.weight": meta(768)}
    with pytest.raises(CheckpointError, match="only SD1.5"):
        detect_family(proj, official_layers(SD15_WIDTHS[:10], 768))
    layers = official_layers(SD15_WIDTHS, 768)
    del layers["5.to_k_ip.weight"], layers["5.to_v_ip.weight"]
    with pytest.raises(CheckpointError, match="numbered"):
        detect_family(proj, layers)


@pytest.mark.parametrize("family", ["base", "plus", "full-face"])
def test_bin_and_safetensors_load_the_same(tmp_path, family):
    sd = tiny_adapters.adapter_state_dict(family, [32] * 16, 32, 48, seed=3)
    a = load_adapter(tiny_adapters.save_adapter(sd, str(tmp_path / "a.safetensors")))
    b = load_adapter(tiny_adapters.save_adapter(sd, str(tmp_path / "a.bin")))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert torch.equal(a.ip_layers[3].to_v_ip.weight, sd["ip_adapter"]["7.to_v_ip.weight"])


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bad_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_file(str(tmp_path / "missing.safetensors"))
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_file(str(tmp_path / "corrupt.safetensors"))
    torch.save([torch.zeros(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_file(str(tmp_path / "list.bin"))
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError):
        load_file(str(tmp_path / "evil.bin"))
    torch.save({"image_proj": {"proj.weight": torch.zeros(2, 2)}}, tmp_path / "half.bin")
    with pytest.raises(CheckpointError, match="not an IP-Adapter"):
        load_adapter(str(tmp_path / "half.bin"))
    sd = tiny_adapters.adapter_state_dict("base", [32] * 16, 32, 24)
    sd["image_proj"]["norm.weight"] = torch.ones(16)
    with pytest.raises(CheckpointError, match="outputs width"):
        IPAdapterModel.from_parts(sd["image_proj"], sd["ip_adapter"])


def test_site_tables():
    sd15 = sites_from_transformers(list(SD15_TRANSFORMERS))
    assert len(sd15) == 16
    by_key = {s.key: s for s in sd15}
    assert by_key[("middle", 0, 0)].adapter_index == 15 and by_key[("middle", 0, 0)].transformer_index == 6
    assert [by_key[("input", i, 0)].adapter_index for i in (1, 2, 4, 5, 7, 8)] == list(range(6))
    assert [by_key[("output", i, 0)].adapter_index for i in range(3, 12)] == list(range(6, 15))
    sdxl = sites_from_transformers(list(SDXL_TRANSFORMERS))
    assert len(sdxl) == 70 and sorted(s.adapter_index for s in sdxl) == list(range(70))
    by_key = {s.key: s for s in sdxl}
    assert [by_key[("middle", 0, i)].adapter_index for i in range(10)] == list(range(60, 70))
    assert by_key[("output", 0, 0)].adapter_index == 24 and by_key[("output", 5, 1)].adapter_index == 59
    assert by_key[("input", 8, 9)].adapter_index == 23


def test_weight_types():
    sd15, sdxl = list(SD15_TRANSFORMERS), list(SDXL_TRANSFORMERS)
    assert layer_weights("linear", sd15, "sd15", 0.8) == dict.fromkeys(range(16), (0.8, False))
    assert layer_weights("style transfer", sdxl, "sdxl", 1.0) == {6: (1.0, False)}
    assert layer_weights("composition", sd15, "sd15", 2.0) == {4: (0.5, False), 5: (2.0, False)}
    sc = layer_weights("style and composition", sdxl, "sdxl", 1.0, composition_weight=0.5)
    assert sc == {6: (1.0, False), 3: (0.5, True)}
    ease_in = layer_weights("ease in", sd15, "sd15", 1.0)
    assert ease_in[0][0] == pytest.approx(1.0) and ease_in[15][0] == pytest.approx(0.05 + 0.95 / 16)
    weak = layer_weights("weak middle", sdxl, "sdxl", 1.0)
    assert weak[4][0] == pytest.approx(0.2) and weak[0][0] == 1.0
    with pytest.raises(ValueError):
        layer_weights("nonsense", sd15, "sd15", 1.0)


def test_token_grid():
    assert token_grid((64, 64), 4096) == (64, 64)
    assert token_grid((64, 64), 256) == (16, 16)
    assert token_grid((13, 7), 8) == (4, 2)  # 13x7 -> 7x4 -> 4x2
    assert token_grid((128, 96), 24 * 32) == (32, 24)
    with pytest.raises(ValueError):
        token_grid((64, 64), 1000)


def test_scaling_modes_and_weights():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 10, 64, generator=g) for _ in range(3))
    k, v = k[:, :4], v[:, :4]
    base = attention(q, k, v, 4)
    assert torch.allclose(ip_attention(q, k, v, 4, 0.5, "V only"), 0.5 * base, atol=1e-6)
    assert torch.allclose(ip_attention(q, k, v, 4, 1.0, "K+V"), base, atol=1e-6)
    assert not torch.allclose(ip_attention(q, k, v, 4, 0.5, "K+V"), 0.5 * base, atol=1e-3)
    assert torch.allclose(ip_attention(q, k, v, 4, 20.0, "K+V w/ C penalty"), ip_attention(q, k, v, 4, 1.0, "K+V"), atol=1e-5)


def _patch(mask=None, weights=None):
    sd = tiny_adapters.adapter_state_dict("base", [64] * 16, 32, 24, seed=1)
    adapter = IPAdapterModel.from_parts(sd["image_proj"], sd["ip_adapter"])
    cond, uncond = project_images(adapter, torch.randn(1, 24), torch.zeros(1, 24), "concat")
    return IPAdapterPatch(adapter, cond, uncond, weights or dict.fromkeys(range(16), (1.0, False)), mask=mask)


def test_patch_cond_uncond_layout():
    patch = _patch()
    q = torch.randn(1, 16, 64)
    d_cond = patch.delta(0, q, None, SiteCall(4, [0]))
    d_uncond = patch.delta(0, q, None, SiteCall(4, [1]))
    both = patch.delta(0, torch.cat([q, q]), None, SiteCall(4, [1, 0]))
    assert torch.allclose(both[0], d_uncond[0], atol=1e-6) and torch.allclose(both[1], d_cond[0], atol=1e-6)
    assert not torch.allclose(d_cond, d_uncond, atol=1e-3)
    batch = patch.delta(0, torch.cat([q, q, q, q]), None, SiteCall(4, [0, 1]))  # 2 latents per chunk
    assert torch.allclose(batch[1], d_cond[0], atol=1e-6) and torch.allclose(batch[3], d_uncond[0], atol=1e-6)


def test_patch_skips_zero_and_missing_sites():
    patch = _patch(weights={0: (0.0, False), 1: (1.0, False)})
    q = torch.randn(1, 16, 64)
    assert patch.delta(0, q, None, SiteCall(4, [0])) is None and patch.delta(5, q, None, SiteCall(4, [0])) is None
    assert patch.delta(1, q, None, SiteCall(4, [0])) is not None


def test_mask_limits_the_image_prompt():
    mask = torch.zeros(1, 32, 32)
    mask[:, :, :16] = 1.0  # left half
    patch = _patch(mask=mask)
    q = torch.randn(2, 16, 64)
    d = patch.delta(0, q, None, SiteCall(4, [0, 1], latent_hw=(4, 4))).reshape(2, 4, 4, 64)
    assert d[:, :, 2:].abs().max() == 0 and d[:, :, :2].abs().min() > 0
    assert len(patch._mask_cache) == 1
    patch.delta(0, q, None, SiteCall(4, [0, 1], latent_hw=(4, 4)))
    assert len(patch._mask_cache) == 1  # resized once per resolution
    with pytest.raises(ValueError, match="frames"):
        _patch(mask=torch.ones(3, 8, 8)).delta(0, q, None, SiteCall(4, [0, 1], latent_hw=(4, 4)))


def test_combine_and_concat():
    x = torch.tensor([[3.0, 4.0], [0.0, 10.0]])
    assert torch.allclose(combine_features(x, "average"), torch.tensor([[1.5, 7.0]]))
    na = combine_features(x, "norm average")
    assert torch.allclose(na, torch.tensor([[0.3, 0.9]]) * 7.5)
    sd = tiny_adapters.adapter_state_dict("base", [64] * 16, 32, 24, seed=1)
    adapter = IPAdapterModel.from_parts(sd["image_proj"], sd["ip_adapter"])
    x = torch.randn(3, 24)
    c, u = project_images(adapter, x, torch.zeros(1, 24), "concat")
    assert c.shape == (1, 12, 32) and u.shape == (1, 12, 32)
    assert torch.allclose(c[:, 4:8], adapter.project(x[1:2]), atol=1e-6)  # image i's tokens, in order
    assert torch.allclose(u[:, 8:12], adapter.project(torch.zeros(1, 24)), atol=1e-6)
    c2, _ = project_images(adapter, x, torch.zeros(1, 24), "average")
    assert torch.allclose(c2, adapter.project(x.mean(0, keepdim=True)), atol=1e-6)
    with pytest.raises(ValueError, match="empty"):
        project_images(adapter, torch.zeros(0, 24), torch.zeros(1, 24), "concat")
    with pytest.raises(ValueError, match="width"):
        adapter.project(torch.randn(1, 25))


def test_embeds_roundtrip(tmp_path):
    e = IPAEmbeds(torch.randn(2, 5, 8), torch.zeros(1, 5, 8), "penultimate")
    path = e.save(str(tmp_path / "x.ipaembeds.safetensors"))
    f = IPAEmbeds.load(path)
    assert torch.equal(f.cond, e.cond) and torch.equal(f.uncond, e.uncond) and f.feature == "penultimate"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    from safetensors.torch import save_file
    save_file({"cond": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an IP-Adapter embeds"):
        IPAEmbeds.load(str(tmp_path / "other.safetensors"))
