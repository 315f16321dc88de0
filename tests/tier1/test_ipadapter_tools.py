"""Tier 1: what issue 14 adds to the IP-Adapter core, against independent statements of the semantics of
ComfyUI_IPAdapter_plus (``IPAdapterPlus.py`` / ``CrossAttentionPatch.py``, read for facts; the expected tables are
written out here): the precise weight types, per-layer weights, the combine methods, unfolded batches (reference i for
latent i, under CFG and context windows), noise negatives, the CLIP-vision prep and the reference tiles."""
import pytest
import torch

from comfyui_personalize.models import images as imgs
from comfyui_personalize.models.attention import SiteCall, TokenPatch
from comfyui_personalize.models.ipadapter import IPAdapterModel, IPAdapterPatch, combine_rows
from comfyui_personalize.models.layers import MAIN, NEGATED, SD15_TRANSFORMERS, SDXL_TRANSFORMERS, layer_weights, parse_layer_weights
from comfyui_personalize.models.presets import PRESETS, find_file

# ComfyUI_IPAdapter_plus' dicts, with weight w = 0.7 and boost b = 1.3: {t_idx: (weight, negated?)}
W, B = 0.7, 1.3
POPULAR = {
    ("style transfer precise", "sdxl"): {3: (B, True), 6: (W, False)},
    ("style transfer precise", "sd15"): {**dict.fromkeys((0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), (W, False)),
                                         4: (B * 0.25, True), 5: (B, True)},
    ("composition precise", "sdxl"): {**dict.fromkeys((0, 1, 2, 4, 5, 7, 8, 9, 10), (B * 0.1, True)), 3: (W, False), 6: (B, True)},
    ("composition precise", "sd15"): {**dict.fromkeys((0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), (B, True)),
                                      **dict.fromkeys((6, 7, 8), (B * 0.1, True)), 4: (W * 0.25, False), 5: (W, False)},
}


@pytest.mark.parametrize("kind, layout", list(POPULAR))
def test_precise_weight_types_are_the_popular_tables(kind, layout):
    transformers = list(SDXL_TRANSFORMERS if layout == "sdxl" else SD15_TRANSFORMERS)
    got = layer_weights(kind, transformers, layout, W, B)
    want = POPULAR[(kind, layout)]
    assert sorted(got) == sorted(want)
    for t, (w, negated) in want.items():
        assert got[t][0] == pytest.approx(w) and (got[t][1] == NEGATED) == negated


def test_parse_layer_weights():
    assert parse_layer_weights("3:1.0, 6:0.5", 16) == {3: 1.0, 6: 0.5}
    assert parse_layer_weights("1, 0.5\n0", 3) == {0: 1.0, 1: 0.5, 2: 0.0}
    for text, match in (("1, 2", "lists 2 weights but this model has 16"), ("16:1", "16 does not exist"),
                        ("1:1, 1:2", "given twice"), ("1:1, 2", "mixes"), ("a:1", "not index:weight"), ("", "empty"),
                        ("1:nan", "not a finite")):
        with pytest.raises(ValueError, match=match):
            parse_layer_weights(text, 16)


def test_combine_methods_on_known_tensors():
    rows = torch.tensor([[1.0, -2.0, 3.0], [3.0, 2.0, -1.0], [-1.0, 0.0, 4.0]])
    assert torch.equal(combine_rows(rows, "concat"), rows)
    assert torch.equal(combine_rows(rows, "add"), torch.tensor([[3.0, 0.0, 6.0]]))
    assert torch.allclose(combine_rows(rows, "subtract"), torch.tensor([[1 - 1.0, -2 - 1.0, 3 - 1.5]]))
    assert torch.allclose(combine_rows(rows, "average"), torch.tensor([[1.0, 0.0, 2.0]]))
    norms = torch.tensor([11 ** 0.5, 8 ** 0.5, 26 ** 0.5])  # the norm of each column, over the rows (dim 0)
    assert torch.allclose(combine_rows(rows, "norm average"), (rows / norms).mean(0, keepdim=True))
    assert torch.equal(combine_rows(rows, "max"), torch.tensor([[3.0, 2.0, 4.0]]))
    assert torch.equal(combine_rows(rows, "min"), torch.tensor([[-1.0, -2.0, -1.0]]))
    assert torch.equal(combine_rows(torch.zeros(2, 3), "norm average"), torch.zeros(1, 3))  # a zero negative stays zero
    with pytest.raises(ValueError, match="at least two"):
        combine_rows(rows[:1], "subtract")


def test_unfold_takes_reference_i_for_latent_i():
    cond = torch.arange(3.0).reshape(3, 1, 1).expand(3, 2, 4)  # reference r: tokens of value r
    uncond = -torch.ones(1, 2, 4)
    patch = TokenPatch({MAIN: (cond, uncond)}, unfold=True)
    stacked = patch.stacked_tokens(MAIN, torch.device("cpu"), torch.float32)
    rows = patch.rows(MAIN, stacked, [1, 0], 5)  # CFG: uncond chunk then cond chunk, 5 latents, 3 references
    assert rows[:5, 0, 0].tolist() == [-1.0] * 5 and rows[5:, 0, 0].tolist() == [0.0, 1.0, 2.0, 2.0, 2.0]
    window = patch.rows(MAIN, stacked, [0], 2, frames=[1, 4])  # a context window holding latents 1 and 4
    assert window[:, 0, 0].tolist() == [1.0, 2.0]
    plain = TokenPatch({MAIN: (cond[:1], uncond)})
    assert plain.rows(MAIN, plain.stacked_tokens(MAIN, torch.device("cpu"), torch.float32), [0, 1], 2)[:, 0, 0].tolist() == \
        [0.0, 0.0, -1.0, -1.0]
    with pytest.raises(ValueError, match="2 negative references for 3"):
        TokenPatch({MAIN: (cond, -torch.ones(2, 2, 4))}, unfold=True)


def _adapter(cross=8, width=16, clip=6):
    from comfyui_personalize.models.ipadapter import AdapterSpec

    spec = AdapterSpec("base", "sd15", cross, clip, 2, (width,) * 16, dict(clip_dim=clip, cross_dim=cross, tokens=2))
    torch.manual_seed(0)
    model = IPAdapterModel(spec)
    for p in model.parameters():
        p.data.normal_(0, 0.3)
    return model


def test_negated_layers_attend_to_the_reference_on_the_uncond_rows_only():
    model = _adapter()
    cond, uncond = torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    patch = IPAdapterPatch(model, cond, uncond, {0: (1.0, NEGATED), 1: (1.0, MAIN)})
    q = torch.randn(4, 5, 16)
    call = SiteCall(2, [0, 1])
    neg = patch.delta(0, q, None, call)
    main = patch.delta(1, q, None, call)
    assert neg[:2].abs().max() == 0  # cond rows: zero tokens give zero keys and values
    as_cond = IPAdapterPatch(model, cond, uncond, {0: (1.0, MAIN)}).delta(0, q, None, SiteCall(2, [0, 0]))
    assert torch.allclose(neg[2:], as_cond[2:])  # uncond rows: the reference's own attention
    assert main[2:].abs().max() > 0 and not torch.allclose(main[:2], main[2:])


def test_noise_images():
    img = torch.rand(1, 300, 200, 3, generator=torch.Generator().manual_seed(1))
    state = torch.random.get_rng_state()
    a = imgs.noise_image("fade", 0.5, 0, 7, img)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(a, imgs.noise_image("fade", 0.5, 0, 7, img)) and not torch.equal(a, imgs.noise_image("fade", 0.5, 0, 8, img))
    assert a.shape == (1, 224, 224, 3) and a.min() >= 0 and a.max() <= 1
    base = imgs.noise_image("fade", 0.0, 0, 7, img)  # strength 0: the centre square, resized
    assert torch.allclose(imgs.noise_image("dissolve", 0.0, 0, 3, img), base)
    black = imgs.noise_image("gaussian", 0.3, 0, 1)  # no image: a black square plus N(0, 0.3), clamped
    assert black.shape == (1, 224, 224, 3) and (black == 0).float().mean() > 0.45
    for kind in imgs.NOISE_TYPES:
        out = imgs.noise_image(kind, 0.6, 4, 2, img)
        assert out.shape == (1, 224, 224, 3) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="unknown noise type"):
        imgs.noise_image("salt", 0.5, 0, 0)


def test_prep_crops_where_asked_and_pads():
    h, w = 100, 300
    x = torch.linspace(0, 1, w).view(1, 1, w, 1).expand(1, h, w, 3).contiguous()  # brightness grows to the right
    left = imgs.prep_for_clip_vision(x, "BILINEAR", "left", size=64)
    right = imgs.prep_for_clip_vision(x, "BILINEAR", "right", size=64)
    center = imgs.prep_for_clip_vision(x, "BILINEAR", "center", size=64)
    assert left.mean() < 0.2 < center.mean() < 0.8 < right.mean()
    padded = imgs.prep_for_clip_vision(x, "NEAREST", "pad", size=60)
    assert padded.shape == (1, 60, 60, 3) and padded[0, :15].max() == 0 and padded[0, 30, 5:55].max() > 0.9
    sharp = imgs.prep_for_clip_vision(torch.rand(1, 64, 64, 3), "BICUBIC", "center", 0.8, size=64)
    assert sharp.min() >= 0 and sharp.max() <= 1


@pytest.mark.parametrize("h, w, tiles", [(256, 768, 3), (512, 512, 4), (256, 1536, 4), (900, 300, 3)])
def test_reference_tiles_keep_the_borders(h, w, tiles):
    t, masks = imgs.reference_tiles(torch.rand(1, h, w, 3))
    assert t.shape == (tiles, 256, 256, 3) and masks.shape[0] == tiles
    covered = masks.sum(0)
    assert covered.min() >= 1  # every pixel of the (resized) reference is in some tile


def test_presets_find_files_in_order():
    names = ["sub/ip-adapter_sd15_light.safetensors", "ip-adapter_sd15_light_v11.bin", "ip-adapter_sd15.safetensors",
             "ip-adapter-plus_sd15.safetensors", "ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid_sd15.bin"]
    assert find_file(names, PRESETS["light"].patterns["sd15"]) == "ip-adapter_sd15_light_v11.bin"  # v11 first
    assert find_file(names, PRESETS["standard"].patterns["sd15"]) == "ip-adapter_sd15.safetensors"
    assert find_file(names, PRESETS["FaceID"].patterns["sd15"]) == "ip-adapter-faceid_sd15.bin"
    assert find_file(names, PRESETS["FaceID Plus v2"].patterns["sd15"]) == "ip-adapter-faceid-plusv2_sd15.bin"
    assert find_file(names, PRESETS["plus face"].patterns["sd15"]) is None
    for p in PRESETS.values():  # every preset's public names are found by its own patterns
        for layout, public in p.names.items():
            assert all(find_file([n], p.patterns[layout]) == n for n in public), (p.name, layout)
            for n in p.lora_names.get(layout, ()):
                assert find_file([n], p.lora_patterns[layout]) == n
