"""Tier 1: PuLID host-free: checkpoint detection on the public layouts, the encoders and the ID attention against the
reference formulas re-stated here (ToTheBeginning/PuLID encoders.py, encoders_transformer.py, attention_processor.py
IDAttnProcessor2_0) on a tiny diffusers UNet, the multi-image rules, the preprocessing, BiSeNet against facexlib, the
EVA tower's hidden states."""
import copy
import math
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import tiny_pulid
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from pulid_reference import RefIDProcessor

from comfyui_personalize.models import pulid
from comfyui_personalize.models.checkpoints import CheckpointError, load_file
from comfyui_personalize.models.diffusers_host import install_patch
from comfyui_personalize.models.face import image as face_image
from comfyui_personalize.models.face import parsing

TOL = 1e-5
SDXL_WIDTHS = [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10


def meta(*shape):
    return torch.empty(*shape, device="meta")


def mlp(prefix, cin, hidden, cout):
    return {f"{prefix}.0.weight": meta(hidden, cin), f"{prefix}.0.bias": meta(hidden), f"{prefix}.1.weight": meta(hidden),
            f"{prefix}.3.weight": meta(hidden, hidden), f"{prefix}.4.weight": meta(hidden), f"{prefix}.6.weight": meta(cout, hidden)}


def official_layers(style="official", widths=SDXL_WIDTHS, cross=2048):
    names = ("id_to_k", "id_to_v") if style == "official" else ("to_k_ip", "to_v_ip")
    return {f"{2 * k + 1}.{n}.weight": meta(w, cross) for k, w in enumerate(widths) for n in names}


def v1_encoder():  # IDEncoder(width=1280, context_dim=2048, num_token=5): body 1280 -> 1024 -> 1024 -> 10240
    sd = mlp("body", 1280, 1024, 10240)
    for i in range(5):
        sd.update(mlp(f"mapping_{i}", 1024, 1024, 2048))
        sd.update(mlp(f"mapping_patch_{i}", 1024, 1024, 2048))
    return sd


def v11_encoder():  # IDFormer(dim=1024, depth=10, dim_head=64, heads=16, num_id_token=5, num_queries=32, output_dim=2048)
    sd = {"latents": meta(1, 32, 1024), "proj_out": meta(1024, 2048), **mlp("id_embedding_mapping", 1280, 1024, 5120)}
    for i in range(10):
        sd.update({f"layers.{i}.0.norm1.weight": meta(1024), f"layers.{i}.0.to_q.weight": meta(1024, 1024),
                   f"layers.{i}.0.to_kv.weight": meta(2048, 1024), f"layers.{i}.0.to_out.weight": meta(1024, 1024),
                   f"layers.{i}.1.0.weight": meta(1024), f"layers.{i}.1.1.weight": meta(4096, 1024),
                   f"layers.{i}.1.3.weight": meta(1024, 4096)})
    for i in range(5):
        sd.update(mlp(f"mapping_{i}", 1024, 1024, 1024))
    return sd


@pytest.mark.parametrize("encoder, style, version, tokens", [
    (v1_encoder, "official", "v1", 10),      # pulid_v1.bin
    (v1_encoder, "converted", "v1", 10),     # ip-adapter_pulid_sdxl_fp16.safetensors (image_proj / ip_adapter)
    (v11_encoder, "official", "v1.1", 32),   # pulid_v1.1.safetensors
])
def test_detects_the_public_layouts(encoder, style, version, tokens):
    spec = pulid.detect(encoder(), official_layers(style))
    assert (spec.version, spec.layout, spec.tokens, spec.cross_dim, spec.id_width, spec.vit_width) == \
        (version, "sdxl", tokens, 2048, 1280, 1024)
    assert spec.widths == tuple(SDXL_WIDTHS)
    if version == "v1.1":
        assert spec.encoder_config["heads"] == 16 and spec.encoder_config["depth"] == 10


def test_detection_refuses_damaged_files():
    with pytest.raises(CheckpointError, match="not a PuLID checkpoint"):
        pulid.detect({}, official_layers())
    layers = official_layers()
    del layers["7.id_to_v.weight"]
    with pytest.raises(CheckpointError, match="incomplete"):
        pulid.detect(v1_encoder(), layers)
    enc = v1_encoder()
    enc["body.0.weight"] = meta(1024)
    with pytest.raises(CheckpointError, match="body.0.weight has shape"):
        pulid.detect(enc, official_layers())
    with pytest.raises(CheckpointError, match="unknown PuLID encoder"):
        pulid.detect({k: v for k, v in v1_encoder().items() if not k.startswith("body")}, official_layers())


# ---------------------------------------------------------------------------------------------------------------
# Encoders, against the reference formulas


def ref_mlp(sd, prefix, x):
    for i in (0, 3):
        x = F.leaky_relu(F.layer_norm(F.linear(x, sd[f"{prefix}.{i}.weight"], sd[f"{prefix}.{i}.bias"]),
                                      (sd[f"{prefix}.{i + 1}.weight"].shape[0],), sd[f"{prefix}.{i + 1}.weight"],
                                      sd[f"{prefix}.{i + 1}.bias"]))
    return F.linear(x, sd[f"{prefix}.6.weight"], sd[f"{prefix}.6.bias"])


def ref_idencoder(sd, x, y, num_token, context_dim):
    """encoders.py IDEncoder.forward: body -> num_token tokens, then per scale mapping(cls) + mean(mapping_patch)."""
    out = [ref_mlp(sd, "body", x).reshape(-1, num_token, context_dim)]
    for i, h in enumerate(y):
        out.append(ref_mlp(sd, f"mapping_{i}", h[:, :1]) + ref_mlp(sd, f"mapping_patch_{i}", h[:, 1:]).mean(1, keepdim=True))
    return torch.cat(out, dim=1)


def ref_perceiver(sd, p, x, latents, heads):
    """encoders_transformer.py PerceiverAttention: q from LN(latents), k/v from cat(LN(x), LN(latents)); q and k
    each scaled by dim_head^-1/4, softmax in float."""
    ln = lambda t, n: F.layer_norm(t, (t.shape[-1],), sd[f"{p}.{n}.weight"], sd[f"{p}.{n}.bias"])  # noqa: E731
    x, latents = ln(x, "norm1"), ln(latents, "norm2")
    q = F.linear(latents, sd[f"{p}.to_q.weight"])
    k, v = F.linear(torch.cat([x, latents], dim=-2), sd[f"{p}.to_kv.weight"]).chunk(2, dim=-1)
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    w = torch.softmax(((q * scale) @ (k * scale).transpose(-2, -1)).float(), dim=-1)
    out = (w @ v).permute(0, 2, 1, 3).reshape(latents.shape[0], latents.shape[1], -1)
    return F.linear(out, sd[f"{p}.to_out.weight"])


def ref_idformer(sd, cfg, x, y):
    """encoders_transformer.py IDFormer.forward."""
    dim, per = cfg["dim"], cfg["depth"] // 5
    latents = sd["latents"].repeat(x.shape[0], 1, 1)
    images = x.shape[1] if x.ndim == 3 else 1
    x = ref_mlp(sd, "id_embedding_mapping", x).reshape(-1, cfg["num_id_token"] * images, dim)
    latents = torch.cat([latents, x], dim=1)
    for i in range(5):
        ctx = torch.cat([x, ref_mlp(sd, f"mapping_{i}", y[i])], dim=1)
        for j in range(i * per, (i + 1) * per):
            latents = ref_perceiver(sd, f"layers.{j}.0", ctx, latents, cfg["heads"]) + latents
            h = F.layer_norm(latents, (dim,), sd[f"layers.{j}.1.0.weight"], sd[f"layers.{j}.1.0.bias"])
            latents = F.linear(F.gelu(F.linear(h, sd[f"layers.{j}.1.1.weight"])), sd[f"layers.{j}.1.3.weight"]) + latents
    return latents[:, :cfg["num_queries"]] @ sd["proj_out"]


def tiny_model(version):
    sd = tiny_pulid.pulid_state_dict(version)
    parts = {"encoder": {k[len("id_adapter."):]: v for k, v in sd.items() if k.startswith("id_adapter.")},
             "layers": {k[len("id_adapter_attn_layers."):]: v for k, v in sd.items() if k.startswith("id_adapter_attn_layers.")}}
    return pulid.PuLIDModel.from_parts(parts["encoder"], parts["layers"]).eval(), parts["encoder"]


def features(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = model.spec
    return pulid.PuLIDEmbeds(torch.randn(n, spec.id_width, generator=g),
                             [torch.randn(n, 577, spec.vit_width, generator=g) for _ in range(5)])


def test_encoders_equal_the_reference_formulas():
    model, sd = tiny_model("v1")
    e = features(model, 3)
    with torch.no_grad():
        ours = model.encoder(e.id_cond, e.hidden)
    ref = ref_idencoder(sd, e.id_cond, e.hidden, 5, model.spec.cross_dim)
    assert ours.shape == (3, 10, model.spec.cross_dim) and (ours - ref).abs().max() <= TOL

    model, sd = tiny_model("v1.1")
    cfg = model.spec.encoder_config
    for n in (1, 3):
        e = features(model, n, seed=n)
        x, y = e.id_cond[None], [h.reshape(1, -1, h.shape[-1]) for h in e.hidden]
        with torch.no_grad():
            ours = model.encoder(x, y)
        ref = ref_idformer(sd, cfg, x, y)
        assert ours.shape == (1, 32, model.spec.cross_dim) and (ours - ref).abs().max() <= TOL * max(1, ref.abs().max())


def test_several_images_follow_the_reference():
    """v1 (app.py): the first image's 10 tokens, then each further image's first 5 (all 10 with id_mix), uncond alike;
    v1.1 (pipeline_v1_1.py): one IDFormer call over all images, uncond from one zero image."""
    model, _ = tiny_model("v1")
    e = features(model, 3)
    with torch.no_grad():
        cond, uncond = pulid.encode_tokens(model, e)
        mixed, _ = pulid.encode_tokens(model, e, id_mix=True)
        each = [model.encoder(e.id_cond[i:i + 1], [h[i:i + 1] for h in e.hidden]) for i in range(3)]
        zero = model.encoder(torch.zeros(1, model.spec.id_width), [torch.zeros(1, 577, model.spec.vit_width)] * 5)
    assert cond.shape[1] == 20 and mixed.shape[1] == 30 and uncond.shape == cond.shape
    assert torch.equal(cond, torch.cat([each[0], each[1][:, :5], each[2][:, :5]], 1))
    assert torch.equal(uncond, torch.cat([zero, zero[:, :5], zero[:, :5]], 1))
    model, _ = tiny_model("v1.1")
    e = features(model, 2)
    with torch.no_grad():
        cond, uncond = pulid.encode_tokens(model, e)
        one_call = model.encoder(e.id_cond[None], [h.reshape(1, 2 * 577, -1) for h in e.hidden])
    assert cond.shape == uncond.shape == (1, 32, model.spec.cross_dim) and torch.equal(cond, one_call)


# ---------------------------------------------------------------------------------------------------------------
# The ID attention, against the reference processor re-stated


CROSS = 32


@pytest.fixture(scope="module")
def unet_and_layers():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CROSS, attention_head_dim=8, norm_num_groups=32).eval()
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    mods = dict(unet.named_modules())
    layers = torch.nn.ModuleList([pulid.IDLayer(CROSS, mods[n[:-len(".processor")]].to_q.out_features) for n in names])
    with torch.no_grad():
        for p in layers.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    return unet, names, layers


@pytest.mark.parametrize("projection", ["none", "ortho", "ortho_v2"])
@pytest.mark.parametrize("num_zero", [0, 8])
def test_id_attention_equals_the_reference(unet_and_layers, projection, num_zero):
    unet, names, layers = unet_and_layers
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(1, 10, CROSS, generator=g), torch.randn(1, 10, CROSS, generator=g)
    x, t, text = torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 7, CROSS, generator=g)
    ref = copy.deepcopy(unet)
    procs = dict(ref.attn_processors)
    for k, n in enumerate(names):  # the CFG batch [uncond, cond], as the reference pipelines lay it out
        procs[n] = RefIDProcessor(layers[k], torch.cat([uncond, cond]), 0.8, projection, num_zero)
    ref.set_attn_processor(procs)
    ours = copy.deepcopy(unet)
    install_patch(ours, pulid.PuLIDPatch(types.SimpleNamespace(id_layers=layers), cond, uncond, 0.8, projection, num_zero),
                  len(names), chunks=[1, 0])
    with torch.no_grad():
        a = ref(x, t, encoder_hidden_states=text).sample
        b = ours(x, t, encoder_hidden_states=text).sample
        plain = unet(x, t, encoder_hidden_states=text).sample
    assert (a - plain).abs().max() > 1e-2  # the identity matters
    assert (a - b).abs().max() <= TOL


def test_cond_only_and_batched_layouts(unet_and_layers):
    """cfg 1 sends the cond chunk alone; a batch of 2 latents per chunk takes each row's tokens."""
    unet, names, layers = unet_and_layers
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 10, CROSS, generator=g), torch.randn(1, 10, CROSS, generator=g)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, CROSS, generator=g)
    ours = copy.deepcopy(unet)
    restore = install_patch(ours, pulid.PuLIDPatch(types.SimpleNamespace(id_layers=layers), cond, uncond, 0.8, "ortho_v2", 8),
                            len(names), chunks=[0])
    with torch.no_grad():
        alone = ours(x, 500, encoder_hidden_states=text).sample
        restore.state["chunks"] = [1, 0]
        both = ours(torch.cat([x, x, x, x]), 500, encoder_hidden_states=torch.cat([text] * 4)).sample
    assert (both[2:] - alone).abs().max() <= TOL and (both[:2] - alone).abs().max() > 1e-3


def test_the_patch_refuses_bad_settings():
    layers = types.SimpleNamespace(id_layers=[])
    with pytest.raises(ValueError, match="unknown projection"):
        pulid.PuLIDPatch(layers, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), 1.0, "orthogonal", 0)
    with pytest.raises(ValueError, match="num_zero"):
        pulid.PuLIDPatch(layers, torch.zeros(1, 2, 4), torch.zeros(1, 2, 4), 1.0, "none", -1)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_ffhq_crop_aligns_the_keypoints_with_a_grey_border():
    img = np.zeros((600, 700, 3), np.uint8)
    img[:300, :300] = 200
    kps = face_image.FFHQ_TEMPLATE_512 * 0.5 - np.float32(50)  # a half-size face at the image's top-left corner
    crop = face_image.ffhq_crop(img, kps)
    assert crop.shape == (512, 512, 3)
    m = face_image.umeyama_similarity(kps, face_image.FFHQ_TEMPLATE_512)
    mapped = np.c_[kps, np.ones(5)] @ m[:2].T
    np.testing.assert_allclose(mapped, face_image.FFHQ_TEMPLATE_512, atol=1e-3)
    assert tuple(crop[0, 0]) == face_image.FFHQ_BORDER_RGB  # outside the image: facexlib's grey
    assert tuple(crop[256, 256]) == (200, 200, 200)


class FixedParser(torch.nn.Module):
    """A parser whose argmax is given: label 0 (background) on the left half, 1 (skin) on the right."""

    def forward(self, x):
        logits = torch.zeros(x.shape[0], 19, *x.shape[2:])
        logits[:, 0, :, : x.shape[-1] // 2] = 1
        logits[:, 1, :, x.shape[-1] // 2:] = 1
        return logits


def test_face_only_is_white_background_and_grey_face():
    faces = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = parsing.face_only(faces, FixedParser())
    assert torch.equal(out[..., :4], torch.ones(2, 3, 8, 4))
    gray = 0.299 * faces[:, 0:1] + 0.587 * faces[:, 1:2] + 0.114 * faces[:, 2:3]
    assert torch.equal(out[..., 4:], gray.repeat(1, 3, 1, 1)[..., 4:])
    assert set(parsing.BACKGROUND_LABELS) == {0, 16, 18, 7, 8, 9, 14, 15}


def test_eva_input_and_id_cond():
    faces = torch.rand(1, 3, 512, 512)
    x = pulid.eva_input(faces, 336)
    ref = F.interpolate(faces, size=(336, 336), mode="bicubic", align_corners=False)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(x, (ref - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1), atol=1e-6)
    arc, eva = torch.randn(2, 512) * 20, torch.randn(2, 16)
    cond = pulid.id_cond(arc, eva)
    assert torch.equal(cond[:, :512], arc)  # the raw embedding, not normalized
    assert torch.allclose(cond[:, 512:].norm(dim=1), torch.ones(2))


def test_bisenet_equals_facexlib(tmp_path):
    pytest.importorskip("facexlib.parsing.bisenet", reason="facexlib not installed: BiSeNet parity skipped")
    from facexlib.parsing.bisenet import BiSeNet as FacexlibBiSeNet

    ours = parsing.load_parser(load_file(tiny_pulid.write_tiny_parsing(str(tmp_path / "parsing_bisenet.pth"))))
    ref = FacexlibBiSeNet(19).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x)[0])


def test_parser_file_errors():
    with pytest.raises(CheckpointError, match="ParseNet"):
        parsing.load_parser({"encoder.0.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------------------
# EVA-CLIP tower


def test_eva_tower_gives_the_inputs_of_blocks_4_to_20(tmp_path):
    pytest.importorskip("timm", reason="timm not installed: the EVA-CLIP tower needs it")
    from comfyui_personalize.models.eva_clip import HIDDEN_BLOCKS, EVAVisionTower

    tower = EVAVisionTower.from_state_dict(load_file(tiny_pulid.write_tiny_eva_clip(str(tmp_path / "eva.pt"))))
    seen = {}
    hooks = [tower.model.blocks[b].register_forward_pre_hook(lambda m, args, kw, b=b: seen.__setitem__(b, args[0].clone()),
                                                             with_kwargs=True) for b in HIDDEN_BLOCKS]
    x = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, hidden = tower(x)
        final = tower.model.forward_features(x)
    for h in hooks:
        h.remove()
    assert [tuple(h.shape) for h in hidden] == [(2, 577, tiny_pulid.TINY_EVA["width"])] * 5
    assert all(torch.equal(h, seen[b]) for h, b in zip(hidden, HIDDEN_BLOCKS))
    assert torch.allclose(pooled, tower.model.head(final[:, 0]), atol=1e-6)
    assert pooled.shape == (2, tiny_pulid.TINY_EVA["projection"])


def test_eva_needs_timm_and_says_so():
    devtools = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "devtools")
    code = ("import sys; sys.modules['timm'] = None; sys.modules['timm.models'] = None\n"
            f"sys.path.insert(0, {devtools!r})\n"
            "import pack_alias; pack_alias.register()\n"
            "from comfyui_personalize.models import eva_clip, pulid\n"
            "try:\n    eva_clip.EVAVisionTower({})\nexcept ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install timm" in out.stdout, out.stderr[-2000:]


def test_embeds_round_trip(tmp_path):
    model, _ = tiny_model("v1")
    e = features(model, 2)
    path = e.save(str(tmp_path / "x.pulidembeds.safetensors"))
    back = pulid.PuLIDEmbeds.load(path)
    assert torch.equal(back.id_cond, e.id_cond) and all(torch.equal(a, b) for a, b in zip(back.hidden, e.hidden))
    from safetensors.torch import save_file
    save_file({"id_cond": torch.zeros(1, 4)}, str(tmp_path / "bad.safetensors"), metadata={"format": pulid.EMBEDS_FORMAT})
    with pytest.raises(CheckpointError, match="damaged"):
        pulid.PuLIDEmbeds.load(str(tmp_path / "bad.safetensors"))
