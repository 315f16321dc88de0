"""Tier 1: PuLID-FLUX and the XLabs IP-Adapter on a tiny diffusers Flux (``FluxTransformer2DModel``, real topology,
small widths), through our block patches on the diffusers host (``models/diffusers_flux.py``):
- XLabs against diffusers' own implementation (``FluxIPAdapterAttnProcessor``, loaded from the official key layout);
- PuLID-FLUX against a re-statement of the official loop (ToTheBeginning/PuLID ``flux/model.py``: a cross-attention
  after double block i with i % 2 == 0 and single block i with i % 4 == 0, on the image tokens) written here as forward
  hooks, with the cross-attention re-stated from ``PerceiverAttentionCA``;
- the block tables, detection and its errors, the several-images modes, masks.
"""
import copy

import pytest
import tiny_flux
import torch
from flux_reference import reference_ca

from comfyui_personalize.models import dit, ipadapter, pulid
from comfyui_personalize.models.checkpoints import CheckpointError, split_prefixes
from comfyui_personalize.models.diffusers_flux import block_patches

diffusers = pytest.importorskip("diffusers")

TOL = 1e-5
GRID = (4, 6)  # image token rows, columns (non-square: a row / column mix-up shows)
TXT = 7


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    f = tiny_flux.TINY_FLUX
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=f["in_channels"] * 4, num_layers=f["depth"], num_single_layers=f["depth_single_blocks"],
        attention_head_dim=f["hidden_size"] // f["num_heads"], num_attention_heads=f["num_heads"],
        joint_attention_dim=f["context_in_dim"], pooled_projection_dim=f["vec_in_dim"], guidance_embeds=True,
        axes_dims_rope=tuple(f["axes_dim"]))
    with torch.no_grad():
        for p in model.parameters():  # diffusers zero-initialises some layers: make every weight count
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    f = tiny_flux.TINY_FLUX
    rows, cols = GRID
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None]
    return dict(hidden_states=torch.randn(batch, rows * cols, f["in_channels"] * 4, generator=g),
                encoder_hidden_states=torch.randn(batch, TXT, f["context_in_dim"], generator=g),
                pooled_projections=torch.randn(batch, f["vec_in_dim"], generator=g),
                timestep=torch.full((batch,), 0.7), guidance=torch.full((batch,), 3.5),
                img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(TXT, 3), return_dict=False)


def run(model, **kw):
    with torch.no_grad():
        return model(**{**inputs(), **kw})[0]


# ---------------------------------------------------------------------------------------------------------------
# XLabs vs diffusers


def diffusers_xlabs(transformer, sd, weight):
    """``transformer`` with diffusers' XLabs IP-Adapter, from the official keys as diffusers' loader renames them
    (``FluxIPAdapterMixin.load_ip_adapter``)."""
    ref = copy.deepcopy(transformer)
    parts = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():
        rest = k.split(".", 1)[1]
        if k.startswith("ip_adapter_proj_model."):
            parts["image_proj"][rest] = v.float()
        else:
            parts["ip_adapter"][rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                                .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", "")] = v.float()
    ref._load_ip_adapter_weights([parts], low_cpu_mem_usage=False)
    for proc in ref.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [weight]
    return ref


def xlabs_model(tokens=4, seed=0):
    sd = tiny_flux.xlabs_state_dict(tokens, seed)
    parts = split_prefixes(sd, ipadapter.XLABS_PARTS)
    return sd, ipadapter.XLabsAdapterModel.from_parts(parts["image_proj"], parts["blocks"]).eval()


@pytest.mark.parametrize("images", [1, 2])
def test_xlabs_equals_diffusers(transformer, images):
    sd, model = xlabs_model()
    g = torch.Generator().manual_seed(5)
    clip = tiny_flux.tiny_models.TINY_CLIP_VISION[tiny_flux.TINY_XLABS_CLIP]["projection_dim"]
    cond, neg = torch.randn(images, clip, generator=g), torch.randn(1, clip, generator=g)
    weight = 0.8
    # batch [uncond, cond] (ComfyUI's cond_or_uncond [1, 0]); diffusers takes the embeds per row, images side by side
    embeds = torch.stack([neg.expand(images, -1), cond])
    want = run(diffusers_xlabs(transformer, sd, weight), joint_attention_kwargs={"ip_adapter_image_embeds": [embeds]})
    with torch.no_grad():
        tok_c, tok_u = ipadapter.project_images(model, cond, neg, "concat")
    patch = ipadapter.XLabsPatch(model, tok_c, tok_u, weight)
    with block_patches(transformer, [patch], chunks=[1, 0], grid=GRID):
        got = run(transformer)
    bare = run(transformer)
    assert (want - bare).abs().max() > 1e-2  # the adapter changes the output
    assert (got - want).abs().max() < TOL


def test_xlabs_layouts_are_read_from_the_keys():
    for tokens in (4, 16):
        _, model = xlabs_model(tokens)
        spec = model.spec
        assert (spec.family, spec.layout, spec.tokens, spec.cross_dim) == ("xlabs-flux", "flux", tokens, 44)
        assert spec.widths == (tiny_flux.TINY_FLUX["hidden_size"],) * tiny_flux.TINY_FLUX["depth"]
        assert model.project(torch.zeros(2, 28)).shape == (2, tokens, 44)
    sd = tiny_flux.xlabs_state_dict(4)
    assert ipadapter.is_xlabs_flux(sd)
    del sd["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"]
    parts = split_prefixes(sd, ipadapter.XLABS_PARTS)
    with pytest.raises(CheckpointError, match=r"double_blocks\.1\.processor\.ip_adapter_double_stream_v_proj\.bias"):
        ipadapter.XLabsAdapterModel.from_parts(parts["image_proj"], parts["blocks"])
    with pytest.raises(ValueError, match="image_embeds of width 28"):
        model.project(torch.zeros(1, 30))


# ---------------------------------------------------------------------------------------------------------------
# PuLID-FLUX vs a re-statement of the official loop


def pulid_model(seed=0):
    sd = tiny_flux.pulid_flux_state_dict(seed)
    parts = split_prefixes(sd, pulid.FLUX_CHECKPOINT_PARTS)
    return sd, pulid.PuLIDFluxModel.from_parts(parts["encoder"], parts["ca"]).eval()


def reference_pulid(transformer, sd, id_rows, weight, heads):
    """``transformer`` with the official PuLID-FLUX loop as forward hooks (its own ca_idx counting)."""
    ref = copy.deepcopy(transformer)
    ca_idx = [0]
    hooks = []

    def after(interval, i):
        def hook(module, args, output):
            txt, img = output
            if i % interval:
                return output
            k = ca_idx[0]
            ca_idx[0] += 1
            return txt, img + weight * reference_ca(sd, k, id_rows, img, heads)
        return hook
    for i, b in enumerate(ref.transformer_blocks):
        hooks.append(b.register_forward_hook(after(2, i)))
    for i, b in enumerate(ref.single_transformer_blocks):
        hooks.append(b.register_forward_hook(after(4, i)))
    return ref, ca_idx


@pytest.mark.parametrize("chunks", [[0], [1, 0]])
def test_pulid_flux_equals_the_official_loop(transformer, chunks):
    sd, model = pulid_model()
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(1, 32, 72, generator=g), torch.randn(1, 32, 72, generator=g)
    id_rows = torch.cat([uncond if c == 1 else cond for c in chunks])
    weight = 0.9
    ref, count = reference_pulid(transformer, sd, id_rows, weight, model.spec.heads)
    kw = inputs(batch=len(chunks))
    with torch.no_grad():
        want = ref(**kw)[0]
    assert count[0] == model.spec.modules == 4
    sites = model.spec.sites((len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)))
    patch = pulid.PuLIDFluxPatch(model, cond, uncond, weight, sites)
    with block_patches(transformer, [patch], chunks=chunks, grid=GRID), torch.no_grad():
        got = transformer(**kw)[0]
    with torch.no_grad():
        bare = transformer(**kw)[0]
    assert (want - bare).abs().max() > 1e-2
    assert (got - want).abs().max() < TOL


def test_the_block_tables_are_the_official_ones():
    sites = dit.interval_sites(dit.FLUX_DEPTHS, pulid.PULID_FLUX_INTERVALS)
    assert len(sites) == 20  # pipeline_flux.py: 19 // 2 + 38 // 4 + 1 + 1
    assert [sites[("double", i)] for i in range(0, 19, 2)] == list(range(10))
    assert [sites[("single", i)] for i in range(0, 38, 4)] == list(range(10, 20))
    assert ("double", 1) not in sites and ("single", 2) not in sites


def test_pulid_flux_detection_and_its_errors(tmp_path):
    sd, model = pulid_model()
    spec = model.spec
    assert (spec.dim, spec.cross_dim, spec.heads, spec.modules, spec.tokens) == (96, 72, 2, 4, 32)
    from safetensors.torch import save_file

    path = str(tmp_path / "pulid_flux.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)
    loaded = pulid.load_pulid(path)
    assert isinstance(loaded, pulid.PuLIDFluxModel) and next(loaded.parameters()).dtype == torch.float32
    broken = {k: v for k, v in sd.items() if k != "pulid_ca.2.to_kv.weight"}
    parts = split_prefixes(broken, pulid.FLUX_CHECKPOINT_PARTS)
    with pytest.raises(CheckpointError, match="cross-attention 2 lacks to_kv.weight"):
        pulid.PuLIDFluxModel.from_parts(parts["encoder"], parts["ca"])
    wrong = dict(sd)
    wrong["pulid_ca.0.to_kv.weight"] = torch.zeros(512, 80)
    parts = split_prefixes(wrong, pulid.FLUX_CHECKPOINT_PARTS)
    with pytest.raises(CheckpointError, match="tokens of width 72 but the cross-attentions take 80"):
        pulid.PuLIDFluxModel.from_parts(parts["encoder"], parts["ca"])


def embeds(n=2, seed=4):
    g = torch.Generator().manual_seed(seed)
    return pulid.PuLIDEmbeds(torch.randn(n, 528, generator=g), [torch.randn(n, 9, 64, generator=g) for _ in range(5)])


def test_the_several_image_modes():
    _, model = pulid_model()
    e = embeds()
    enc = model.pulid_encoder
    with torch.no_grad():
        first, u = pulid.encode_flux_tokens(model, e, pulid.FLUX_IMAGE_MODES[0])
        mean, _ = pulid.encode_flux_tokens(model, e, pulid.FLUX_IMAGE_MODES[1])
        every, _ = pulid.encode_flux_tokens(model, e, pulid.FLUX_IMAGE_MODES[2])
        one = [enc(e.id_cond[i:i + 1], [h[i:i + 1] for h in e.hidden]) for i in range(2)]
        zeros = enc(torch.zeros(1, 528), [torch.zeros(1, 9, 64)] * 5)
    assert (first - one[0]).abs().max() < TOL and (mean - (one[0] + one[1]) / 2).abs().max() < TOL
    assert (u - zeros).abs().max() < TOL  # the official uncond ID: the IDFormer of zeros
    assert every.shape == (1, 32, 72) and (every - first).abs().max() > 1e-3 and (every - mean).abs().max() > 1e-3
    with pytest.raises(ValueError, match="unknown image mode"):
        pulid.encode_flux_tokens(model, e, "sum")


def test_masks_confine_the_delta_to_the_image_tokens_they_cover():
    _, model = pulid_model()
    g = torch.Generator().manual_seed(6)
    cond, uncond = torch.randn(1, 32, 72, generator=g), torch.randn(1, 32, 72, generator=g)
    mask = torch.zeros(1, 40, 60)
    mask[:, :, :30] = 1.0  # the left half
    sites = model.spec.sites((3, 5))
    patch = pulid.PuLIDFluxPatch(model, cond, uncond, 1.0, sites, mask)
    img = torch.randn(2, GRID[0] * GRID[1], 96, generator=g)
    with torch.no_grad():
        d = patch.delta(dit.BlockCall("single", 4, [1, 0], GRID), img).reshape(2, *GRID, 96)
        free = pulid.PuLIDFluxPatch(model, cond, uncond, 1.0, sites).delta(dit.BlockCall("single", 4, [1, 0], GRID), img)
    assert d[:, :, 3:].abs().max() == 0 and (d[:, :, :3] - free.reshape(2, *GRID, 96)[:, :, :3]).abs().max() < TOL
    assert patch.delta(dit.BlockCall("single", 2, [0], GRID), img[:1]) is None  # no cross-attention after single block 2
