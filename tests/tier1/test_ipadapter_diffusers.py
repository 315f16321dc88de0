"""Tier 1: our IP-Adapter on a tiny diffusers UNet equals diffusers' own IP-Adapter (fp32, 1e-5).

Both sides read the same synthetic checkpoint in the official key layout. diffusers converts it with
``UNet2DConditionModel._load_ip_adapter_weights`` (its own projection classes and ``IPAdapterAttnProcessor2_0``);
we load it with ``IPAdapterModel.from_parts`` and install our processor. The UNet is SD1.5 topology (16
cross-attention sites) at small widths.
"""
import copy

import pytest
import tiny_adapters
import torch
from diffusers import UNet2DConditionModel

from comfyui_personalize.models.diffusers_host import install_patch
from comfyui_personalize.models.ipadapter import IPAdapterModel, IPAdapterPatch, project_images

CROSS_DIM = 32
CLIP_EMBED_DIM = 24  # width of the tiny CLIP "image_embeds"
CLIP_HIDDEN_DIM = 48  # width of the tiny CLIP penultimate hidden states
CLIP_TOKENS = 257  # 16x16 patches + class token, as ViT-H/14 at 224 px
TOL = 1e-5


def sd15_topology_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=CROSS_DIM, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def cross_widths(unet) -> list[int]:
    procs = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    mods = dict(unet.named_modules())
    return [mods[n[: -len(".processor")]].to_q.out_features for n in procs]


@pytest.fixture(scope="module")
def unet():
    return sd15_topology_unet()


def features(family: str, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if family == "base":
        return torch.randn(n, CLIP_EMBED_DIM, generator=g)
    return torch.randn(n, CLIP_TOKENS, CLIP_HIDDEN_DIM, generator=g)


def run_both(unet, family, scale, n_images=1, batch=1, seed=0):
    sd = tiny_adapters.adapter_state_dict(family, cross_widths(unet), CROSS_DIM,
                                          CLIP_EMBED_DIM if family == "base" else CLIP_HIDDEN_DIM, seed)
    cond = features(family, n_images, seed + 1)
    # base: zero embeddings as uncond (official); Plus/Full-face: any CLIP output of a "blank" image
    uncond = torch.zeros_like(cond) if family == "base" else features(family, n_images, seed + 2)

    g = torch.Generator().manual_seed(seed + 3)
    x = torch.randn(2 * batch, 4, 8, 8, generator=g)
    text = torch.randn(2 * batch, 7, CROSS_DIM, generator=g)
    t = torch.tensor(500)

    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights([copy.deepcopy(sd)])
    for p in ref.attn_processors.values():
        if hasattr(p, "scale"):
            p.scale = [scale]
    # diffusers pipelines lay the CFG batch out as [uncond, cond]; embeds are [batch, num_images, ...]
    embeds = torch.cat([uncond[None].expand(batch, *uncond.shape), cond[None].expand(batch, *cond.shape)])
    with torch.no_grad():
        out_ref = ref(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [embeds]}).sample

    ours = copy.deepcopy(unet)
    adapter = IPAdapterModel.from_parts(sd["image_proj"], sd["ip_adapter"])
    assert adapter.spec.family == family and adapter.spec.layout == "sd15"
    with torch.no_grad():
        tok_c, tok_u = project_images(adapter, cond, uncond, "concat")
        patch = IPAdapterPatch(adapter, tok_c, tok_u, dict.fromkeys(range(16), (scale, False)))
        install_patch(ours, patch, len(adapter.spec.widths), chunks=[1, 0])
        out = ours(x, t, encoder_hidden_states=text).sample
        plain = unet(x, t, encoder_hidden_states=text).sample
    return out, out_ref, plain


@pytest.mark.parametrize("family", ["base", "plus", "full-face"])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_matches_diffusers(unet, family, scale):
    out, out_ref, plain = run_both(unet, family, scale)
    assert (out - out_ref).abs().max().item() <= TOL
    effect = (out_ref - plain).abs().max().item()
    if scale == 0.0:
        assert effect <= TOL
    else:
        assert effect > 1e-3, "the image branch must change the output, or the comparison proves nothing"


@pytest.mark.parametrize("family", ["base", "plus"])
def test_two_images_concat_and_batch(unet, family):
    """Two reference images concatenated along the token axis (diffusers' num_images), CFG batch of 2x2."""
    out, out_ref, plain = run_both(unet, family, 0.7, n_images=2, batch=2, seed=5)
    assert (out - out_ref).abs().max().item() <= TOL
    assert (out_ref - plain).abs().max().item() > 1e-3


FACEID_CASES = [("faceid", None, 1), ("faceid-portrait", None, 2), ("faceid-plus", None, 1), ("faceid-plus", 0.7, 2)]


@pytest.mark.parametrize("family,shortcut,n_images", FACEID_CASES)
def test_faceid_matches_diffusers(unet, family, shortcut, n_images):
    """FaceID (MLP), Portrait (16 tokens, several faces concatenated), FaceID Plus v1 and v2 (shortcut) against
    diffusers' IPAdapterFaceIDImageProjection / IPAdapterFaceIDPlusImageProjection on the same file."""
    sd = tiny_adapters.adapter_state_dict(family, cross_widths(unet), CROSS_DIM, CLIP_HIDDEN_DIM, seed=11)
    g = torch.Generator().manual_seed(12)
    ids = torch.nn.functional.normalize(torch.randn(n_images, 512, generator=g), dim=-1)
    uncond_ids = torch.zeros(1, 512)  # official uncond: the projection of a zero embedding
    clip_c = torch.randn(n_images, CLIP_TOKENS, CLIP_HIDDEN_DIM, generator=g)
    clip_u = torch.randn(1, CLIP_TOKENS, CLIP_HIDDEN_DIM, generator=g)  # the CLIP encoding of a blank image
    batch, scale = 2, 0.8
    x = torch.randn(2 * batch, 4, 8, 8, generator=g)
    text = torch.randn(2 * batch, 7, CROSS_DIM, generator=g)
    t = torch.tensor(321)
    plus = family == "faceid-plus"

    ref = copy.deepcopy(unet)
    ref._load_ip_adapter_weights([copy.deepcopy(sd)])
    for p in ref.attn_processors.values():
        if hasattr(p, "scale"):
            p.scale = [scale]
    cfg = lambda u, c: torch.cat([u.expand(n_images, *u.shape[1:])[None].expand(batch, -1, *u.shape[1:]),  # noqa: E731
                                  c[None].expand(batch, *c.shape)])
    if plus:
        proj = ref.encoder_hid_proj.image_projection_layers[0]
        proj.clip_embeds = cfg(clip_u, clip_c)  # [batch, num_images, 257, D]
        proj.shortcut, proj.shortcut_scale = shortcut is not None, shortcut or 1.0
    with torch.no_grad():
        out_ref = ref(x, t, encoder_hidden_states=text, added_cond_kwargs={"image_embeds": [cfg(uncond_ids, ids)]}).sample

    ours = copy.deepcopy(unet)
    adapter = IPAdapterModel.from_parts(sd["image_proj"], sd["ip_adapter"])
    assert adapter.spec.family == family
    with torch.no_grad():
        tok_c, tok_u = project_images(adapter, ids, uncond_ids, "concat", clip=(clip_c, clip_u) if plus else None,
                                      shortcut_scale=shortcut)
        install_patch(ours, IPAdapterPatch(adapter, tok_c, tok_u, dict.fromkeys(range(16), (scale, False))), 16, chunks=[1, 0])
        out = ours(x, t, encoder_hidden_states=text).sample
        plain = unet(x, t, encoder_hidden_states=text).sample
    assert (out - out_ref).abs().max().item() <= TOL
    assert (out_ref - plain).abs().max().item() > 1e-3


def test_faceid_lora_keys_are_not_image_layers():
    """FaceID .bin files keep their LoRA in ip_adapter: it is recognised and left out of the image K/V layers."""
    widths = [32] * 16
    sd = tiny_adapters.adapter_state_dict("faceid", widths, CROSS_DIM, CLIP_HIDDEN_DIM, seed=1, lora=True)
    adapter = IPAdapterModel.from_parts(sd["image_proj"], sd["ip_adapter"])
    assert adapter.spec.has_lora and len(adapter.ip_layers) == 16
    assert not any("lora" in k for k in adapter.state_dict())
