"""Tier 1: E4T as mkshing/e4t-diffusion's public weights need it (models/e4t.py, training/e4t.py), in plain torch.

No library implements E4T, so the reference formulas (mkshing ``e4t/weightoffsets.py``, ``e4t/encoder.py``,
``tuning_e4t.py``) are re-stated here in other forms: the weight offset as a closed-form sum of outer products, the head
with stacked per-input weights and einsum, the loss from re-derived draws. kornia is the reference of the CLIP
preprocessing (the reference calls ``kornia.geometry.resize`` and ``kornia.enhance.normalize``).

- ``WeightOffsets``: output and gradients equal the closed form for non-square projections;
- ``OffsetSet``: the reference's ``weight_offsets.pt`` layout round-trips; incomplete or foreign files are refused;
- ``E4THead``: equals the re-stated forward; dims are read from the file; bad files are refused;
- the CLIP inputs (pooled + every second patch token), the preprocessing (kornia; centre crop of a non-square image);
- ``E4TConfig`` on pretraining and tuned configs; the folder loader, its errors and ``save_e4t``;
- the tiny folders of ``devtools/tiny_e4t.py`` (diffusers' projection names; SD1.5's 96 targets / 143.2M parameters);
- ``E4TTrainer`` on a toy host: loss, gradient clipping, a NaN step, resume, refusals.
"""
import copy
import json
import os

import pytest
import tiny_e4t
import torch
import torch.nn.functional as F
from torch import nn

from comfyui_personalize.models import e4t
from comfyui_personalize.models.checkpoints import CheckpointError
from comfyui_personalize.training.e4t import E4TTrainConfig, E4TTrainer
from comfyui_personalize.training.schedule import NoiseSchedule, scaled_linear_alphas_cumprod

# torch.nn.LeakyReLU() default slope, which mkshing's head uses (e4t/encoder.py ``nn.LeakyReLU()``)
SLOPE = 0.01
# mkshing e4t/encoder.py ``mean`` / ``std`` buffers (OpenAI CLIP normalization)
REF_MEAN = (0.48145466, 0.4578275, 0.40821073)
REF_STD = (0.26862954, 0.26130258, 0.27577711)
OFFSET_PARAMS = ("v", "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "linear_column.weight",
                 "linear_column.bias", "linear_row.weight", "linear_row.bias")


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter redrawn (v too, which the reference initializes to 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# ---------------------------------------------------------------------------------------------------------------
# Weight offsets


def offsets_closed_form(p):
    """dW (out, in) of mkshing's WeightOffsets, worked out: with a = W1 v + b1 (in), b = W2 v + b2 (out),
    dW = Wr b (Wc a)^T + (Wr 1) bc^T + br 1^T."""
    a = p["linear1.weight"][:, 0] * p["v"] + p["linear1.bias"]
    b = p["linear2.weight"][:, 0] * p["v"] + p["linear2.bias"]
    wc, bc, wr, br = p["linear_column.weight"], p["linear_column.bias"], p["linear_row.weight"], p["linear_row.bias"]
    return (torch.einsum("op,p,k,ik->oi", wr, b, a, wc) + torch.einsum("op,i->oi", wr, bc)
            + br[:, None] * torch.ones_like(bc)[None, :])


@pytest.mark.parametrize("inp,out", [(5, 3), (3, 7), (6, 6), (48, 32)])
def test_weight_offsets_equal_the_closed_form_with_gradients(inp, out):
    wo = randomized(e4t.WeightOffsets(inp, out).double(), seed=inp * 10 + out)
    delta = wo()
    assert delta.shape == (out, inp)  # the shape of Linear(in, out).weight
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in wo.state_dict().items()}
    ref = offsets_closed_form(leaves)
    close(delta, ref, 1e-12)
    g = torch.randn(out, inp, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = dict(zip([n for n, _ in wo.named_parameters()],
                     torch.autograd.grad((delta * g).sum(), list(wo.parameters()))))
    ref_grads = dict(zip(leaves, torch.autograd.grad((ref * g).sum(), list(leaves.values()))))
    assert set(grads) == set(OFFSET_PARAMS)
    for name in OFFSET_PARAMS:
        close(grads[name], ref_grads[name], 1e-12)


def test_apply_offset_is_w_times_one_plus_dw():
    w = torch.randn(4, 6, dtype=torch.float64)
    d = torch.randn(4, 6, dtype=torch.float64)
    close(e4t.apply_offset(w, d), w + w * d, 1e-14)
    half = e4t.apply_offset(w.half(), d)  # the delta follows the weight's dtype
    assert half.dtype == torch.float16
    close(half.double(), (w.half().double() * (1 + d.half().double())), 2e-3)


def mkshing_offsets(shapes, seed=0):
    """A ``weight_offsets.pt`` dict as mkshing saves it (``{k: v for k in unet.state_dict() if "wo" in k}``)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for target, (out, inp) in shapes.items():
        prefix, proj = target.rsplit(".to_", 1)
        dims = {"v": (1,), "linear1.weight": (inp, 1), "linear1.bias": (inp,), "linear2.weight": (out, 1),
                "linear2.bias": (out,), "linear_column.weight": (inp, inp), "linear_column.bias": (inp,),
                "linear_row.weight": (out, out), "linear_row.bias": (out,)}
        for param, shape in dims.items():
            sd[f"{prefix}.wo_{proj}.{param}"] = torch.randn(shape, generator=g) * 0.3
    return sd


SHAPES = {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (8, 8),
          "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (8, 6),
          "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v": (8, 6)}


def test_offset_set_round_trips_the_reference_layout():
    sd = mkshing_offsets(SHAPES)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.wo_k.linear_column.weight" in sd
    offsets = e4t.OffsetSet.from_reference(sd)
    assert offsets.names == sorted(SHAPES) and offsets.shapes() == SHAPES
    for target, delta in offsets.deltas().items():
        prefix, proj = target.rsplit(".to_", 1)
        p = {k: sd[f"{prefix}.wo_{proj}.{k}"] for k in OFFSET_PARAMS}
        close(delta, offsets_closed_form(p), 1e-5)
    back = offsets.reference_state()
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert e4t.offset_target("mid_block.attentions.0.transformer_blocks.0.attn1.wo_v.linear_row.bias") == (
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v", "linear_row.bias")


@pytest.mark.parametrize("key", ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.wo_out.v",
                                 "down_blocks.0.attentions.0.transformer_blocks.0.attn1.wo_q.linear3.weight"])
def test_offset_set_refuses_a_foreign_key(key):
    sd = {**mkshing_offsets(SHAPES), key: torch.zeros(1)}
    with pytest.raises(CheckpointError, match="is not a weight-offset key") as err:
        e4t.OffsetSet.from_reference(sd, "weight_offsets.pt")
    assert key in str(err.value) and "weight_offsets.pt" in str(err.value)


def test_offset_set_refuses_incomplete_or_misshapen_offsets():
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    sd = mkshing_offsets(SHAPES)
    del sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.wo_k.linear_row.bias"]
    with pytest.raises(CheckpointError, match="lack") as err:
        e4t.OffsetSet.from_reference(sd)
    assert target in str(err.value) and "linear_row.bias" in str(err.value) and "incomplete" in str(err.value)
    sd = mkshing_offsets(SHAPES)
    sd["down_blocks.0.attentions.0.transformer_blocks.0.attn2.wo_k.linear_column.weight"] = torch.zeros(7, 6)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        e4t.OffsetSet.from_reference(sd)
    assert "attn2.wo_k.linear_column.weight (7, 6) vs (6, 6)" in str(err.value)
    with pytest.raises(CheckpointError, match="holds no weight offsets"):
        e4t.OffsetSet.from_reference({})


# ---------------------------------------------------------------------------------------------------------------
# Head and CLIP inputs


def head_reference(sd, clip_in, features):
    """mkshing E4TEncoder.forward after the CLIP tower: u = embedder(features); for each of the n vectors,
    first_linears[i](feature_linear([h_i, u])); mean, LeakyReLU, final_linear. The shared feature_linear is split
    into its h and u halves and the n first_linears are one stacked (n, H, H) weight."""
    u = F.linear(F.leaky_relu(F.linear(features, sd["unet_feature_embedder.0.weight"], sd["unet_feature_embedder.0.bias"]),
                              SLOPE), sd["unet_feature_embedder.2.weight"], sd["unet_feature_embedder.2.bias"])
    hidden = u.shape[-1]
    wf, bf = sd["feature_linear.weight"], sd["feature_linear.bias"]
    z = torch.einsum("bnh,kh->bnk", clip_in, wf[:, :hidden]) + (u @ wf[:, hidden:].T)[:, None] + bf
    n = clip_in.shape[1]
    w = torch.stack([sd[f"first_linears.{i}.weight"] for i in range(n)])
    b = torch.stack([sd[f"first_linears.{i}.bias"] for i in range(n)])
    y = torch.einsum("bnk,njk->bnj", z, w) + b
    return F.linear(F.leaky_relu(y.mean(1), SLOPE), sd["final_linear.weight"], sd["final_linear.bias"])


def test_head_equals_the_reference_forward():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = e4t.E4THead(feature_channels=20, hidden=12, n_inputs=129, word_dim=7).double()
    g = torch.Generator().manual_seed(2)
    clip_in = torch.randn(3, 129, 12, generator=g, dtype=torch.float64)
    feats = torch.randn(3, 20, generator=g, dtype=torch.float64) * 3
    out = head(clip_in, feats)
    assert out.shape == (3, 7)
    close(out, head_reference(head.state_dict(), clip_in, feats), 1e-12)
    with pytest.raises(ValueError, match="takes 129 CLIP vectors, got 128"):
        head(clip_in[:, :128], feats)


def test_head_reads_its_dims_from_the_file_and_refuses_bad_files():
    head = e4t.E4THead(feature_channels=20, hidden=12, n_inputs=9, word_dim=7)
    sd = head.state_dict()
    loaded = e4t.E4THead.from_state_dict(sd)
    assert (loaded.feature_channels, loaded.hidden, loaded.n_inputs, loaded.word_dim) == (20, 12, 9, 7)
    x, f = torch.randn(2, 9, 12), torch.randn(2, 20)
    assert torch.equal(loaded(x, f), head(x, f))
    with pytest.raises(CheckpointError, match="has no 'final_linear.weight': not an E4T encoder"):
        e4t.E4THead.from_state_dict({k: v for k, v in sd.items() if k != "final_linear.weight"}, "encoder.pt")
    with pytest.raises(CheckpointError, match=r"unexpected \['first_linears.9.bias'\]"):
        e4t.E4THead.from_state_dict({**sd, "first_linears.9.bias": torch.zeros(12)}, "encoder.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatch encoder.pt.feature_linear.weight \(12, 25\) vs \(12, 24\)"):
        e4t.E4THead.from_state_dict({**sd, "feature_linear.weight": torch.zeros(12, 25)}, "encoder.pt")


def test_clip_inputs_are_the_pooled_output_and_every_second_patch_token():
    last = torch.arange(2 * 257 * 3, dtype=torch.float32).reshape(2, 257, 3)  # class token, then 256 patch tokens
    pooled = -torch.arange(6, dtype=torch.float32).reshape(2, 3) - 1
    out = e4t.clip_inputs(last, pooled)
    assert out.shape == (2, 129, 3) and e4t.n_clip_inputs(256) == 129
    assert torch.equal(out[:, 0], pooled)
    assert torch.equal(out[:, 1:], last[:, list(range(2, 257, 2))])  # sequence positions 2, 4, ..., 256
    tokens = last[:, 1:]  # open_clip's ``tokens`` (the reference: hidden_states[:, 1::2])
    assert torch.equal(out[:, 1:], tokens[:, 1::2])
    assert e4t.n_clip_inputs(16) == 9 and e4t.clip_inputs(last[:, :17], pooled).shape[1] == 9


def kornia_preprocess(kornia, x):
    """mkshing E4TEncoder.preprocess."""
    x = kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True, antialias=False)
    return kornia.enhance.normalize((x + 1.0) / 2.0, torch.tensor(REF_MEAN), torch.tensor(REF_STD))


def test_preprocess_equals_kornia_and_crops_non_square_images():
    kornia = pytest.importorskip("kornia", reason="kornia (the reference of the E4T preprocessing) not installed")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 512, 512, generator=g) * 2 - 1
    close(e4t.preprocess(x), kornia_preprocess(kornia, x), 1e-5)
    tall = torch.rand(1, 3, 301, 200, generator=g) * 2 - 1
    close(e4t.preprocess(tall), kornia_preprocess(kornia, tall[:, :, 50:250, :]), 1e-5)
    wide = torch.rand(1, 3, 120, 185, generator=g) * 2 - 1
    close(e4t.preprocess(wide), kornia_preprocess(kornia, wide[:, :, :, 32:152]), 1e-5)
    # the crop is there: squashing the whole image gives something else
    assert (e4t.preprocess(tall) - kornia_preprocess(kornia, tall)).abs().max() > 0.1


# ---------------------------------------------------------------------------------------------------------------
# Config


def test_config_of_a_pretraining_run():
    cfg = e4t.E4TConfig.from_dict(tiny_e4t.reference_config("face", "*s", "face"))
    assert (cfg.placeholder_token, cfg.domain_class_token, cfg.domain_embed_scale) == ("*s", "face", 0.1)
    assert cfg.unfreeze_clip_vision is True
    t = cfg.templates()  # pretrain_e4t.py face_templates: 10 templates + 6 portraits
    assert len(t) == 16 and t[0] == "a photo of {placeholder_token}" and t[-1] == "photo realistic portrait of {placeholder_token}"
    assert len(e4t.E4TConfig(prompt_template="normal").templates()) == 10
    art = e4t.E4TConfig(prompt_template="art").templates()
    assert len(art) == 12 and art[-1] == "art by {placeholder_token}"
    assert e4t.E4TConfig(prompt_template="a painting of {placeholder_token}").templates() == ("a painting of {placeholder_token}",)
    with pytest.raises(ValueError, match="has no {placeholder_token}"):
        e4t.E4TConfig(prompt_template="a painting").templates()


def test_config_of_a_tuned_run():
    pre = tiny_e4t.reference_config("cat", "<e4t>", "art")
    tuned = {"pretrained_model_name_or_path": "pretrained-cats/30000", "domain_embed_scale": 0.2, "reg_lambda": 1e-4,
             "train_image_path": "cat.png", "prompt_template": None, "unfreeze_clip_vision": False, "report_to": None,
             "max_train_steps": 15, "pretrained_args": pre}
    cfg = e4t.E4TConfig.from_dict(tuned)
    assert (cfg.domain_class_token, cfg.placeholder_token) == ("cat", "<e4t>")  # from the pretraining args
    assert cfg.domain_embed_scale == 0.2  # tuning's own value wins where it is set
    assert cfg.prompt_template == "art"  # None at the top: the pretraining template
    assert cfg.unfreeze_clip_vision is True  # pretraining trained the tower although tuning did not
    assert cfg.raw["pretrained_args"]["domain_class_token"] == "cat"


def test_config_refusals():
    with pytest.raises(CheckpointError, match="x.json names no domain_class_token"):
        e4t.E4TConfig.from_dict({"placeholder_token": "*s", "pretrained_args": {"domain_class_token": None}}, "x.json")
    with pytest.raises(CheckpointError, match="domain_embed_scale is 'big', not a number"):
        e4t.E4TConfig.from_dict({"domain_class_token": "face", "domain_embed_scale": "big"})


# ---------------------------------------------------------------------------------------------------------------
# Folders


SMALL = dict(offset_targets=tiny_e4t.sd15_offset_targets(8, (1, 2), 6, layers_per_block=1, attention_levels=(0, 1)),
             feature_channels=20, clip_hidden=8, clip_layers=2, clip_heads=2, word_dim=6, seed=3)


def test_tiny_folder_has_mkshings_layout(tmp_path):
    folder = tiny_e4t.write_tiny_e4t(str(tmp_path), **SMALL)
    assert sorted(os.listdir(folder)) == ["config.json", "encoder.pt", "weight_offsets.pt"]
    enc = torch.load(os.path.join(folder, "encoder.pt"), weights_only=True)
    h = 8
    want = {"class_embedding": (h,), "positional_embedding": (257, h), "conv1.weight": (h, 3, 14, 14),
            "ln_pre.weight": (h,), "ln_pre.bias": (h,), "ln_post.weight": (h,), "ln_post.bias": (h,)}
    for n in range(2):
        p = f"transformer.resblocks.{n}."
        want.update({p + "ln_1.weight": (h,), p + "ln_1.bias": (h,), p + "attn.in_proj_weight": (3 * h, h),
                     p + "attn.in_proj_bias": (3 * h,), p + "attn.out_proj.weight": (h, h), p + "attn.out_proj.bias": (h,),
                     p + "ln_2.weight": (h,), p + "ln_2.bias": (h,), p + "mlp.c_fc.weight": (4 * h, h),
                     p + "mlp.c_fc.bias": (4 * h,), p + "mlp.c_proj.weight": (h, 4 * h), p + "mlp.c_proj.bias": (h,)})
    clip = {k[len("clip_vision."):]: tuple(v.shape) for k, v in enc.items() if k.startswith("clip_vision.")}
    assert clip == want  # open_clip VisionTransformer keys, no ``proj``
    head = {k: tuple(v.shape) for k, v in enc.items() if not k.startswith("clip_vision.")}
    assert head["unet_feature_embedder.0.weight"] == (h, 20) and head["final_linear.weight"] == (6, h)
    assert sum(k.startswith("first_linears.") for k in head) == 2 * 129
    wo = torch.load(os.path.join(folder, "weight_offsets.pt"), weights_only=True)
    assert len(wo) == 9 * len(SMALL["offset_targets"])
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["clip_model_name_or_path"] == "ViT-H-14::laion2b_s32b_b79k" and cfg["domain_class_token"] == "face"
    # deterministic from the seed, O(1) activations: dW of order 0.1
    again = torch.load(tiny_e4t.write_tiny_e4t(str(tmp_path / "again"), **SMALL) + "/weight_offsets.pt", weights_only=True)
    assert all(torch.equal(wo[k], again[k]) for k in wo)
    deltas = e4t.OffsetSet.from_reference(wo).deltas()
    assert 0.01 < max(float(d.detach().abs().max()) for d in deltas.values()) < 1.0


def diffusers_projections(**config):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    proj = {n: (m.out_features, m.in_features) for n, m in unet.named_modules() if n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v")}
    channels = unet.conv_in.out_channels + unet.mid_block.resnets[-1].out_channels + sum(
        m.out_channels for b in unet.down_blocks for m in [*b.resnets, *(b.downsamplers or [])])
    return proj, channels


def test_offset_targets_are_diffusers_projections():
    real, channels = diffusers_projections(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768)
    ours = tiny_e4t.sd15_offset_targets(320, context_dim=768)
    assert ours == real and len(ours) == 96
    assert channels == tiny_e4t.sd15_feature_channels(320) == e4t.SD1_FEATURE_CHANNELS
    assert round(tiny_e4t.offset_param_count(ours) / 1e6, 1) == 143.2  # research notes §2.1 (counted on a meta model)
    tiny, channels = diffusers_projections(block_out_channels=(32, 64, 128, 128), cross_attention_dim=48)
    assert tiny == tiny_e4t.TINY_SD15_OFFSET_TARGETS and channels == tiny_e4t.TINY_SD15_FEATURE_CHANNELS == 1088
    small = tiny_e4t.sd15_offset_targets(8, (1, 2), 6, layers_per_block=1, attention_levels=(0, 1))
    assert sum(p.numel() for p in e4t.OffsetSet(small).parameters()) == tiny_e4t.offset_param_count(small)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_load_e4t_reads_the_reference_layout(tmp_path, fmt):
    folder = tiny_e4t.write_tiny_e4t(str(tmp_path), fmt=fmt, **SMALL)
    if fmt == "pt":
        enc, wo = (torch.load(os.path.join(folder, f), weights_only=True) for f in ("encoder.pt", "weight_offsets.pt"))
    else:
        from safetensors.torch import load_file

        enc, wo = (load_file(os.path.join(folder, f)) for f in ("encoder.safetensors", "weight_offsets.safetensors"))
    w = e4t.load_e4t(folder)
    assert (w.head.feature_channels, w.head.hidden, w.head.n_inputs, w.head.word_dim) == (20, 8, 129, 6)
    assert all(torch.equal(v, enc[k]) for k, v in w.head.state_dict().items())
    assert w.clip_vision.keys() == {k[len("clip_vision."):] for k in enc if k.startswith("clip_vision.")}
    assert all(torch.equal(v, enc["clip_vision." + k]) for k, v in w.clip_vision.items())
    assert w.offsets.shapes() == SMALL["offset_targets"]
    assert all(torch.equal(v, wo[k]) for k, v in w.offsets.reference_state().items()) and len(wo) == 9 * len(SMALL["offset_targets"]) == 378
    assert (w.config.domain_class_token, w.config.placeholder_token, w.offsets_in_unet) == ("face", "*s", False)


def test_load_e4t_errors(tmp_path):
    folder = tiny_e4t.write_tiny_e4t(str(tmp_path / "m"), **SMALL)
    enc_path, wo_path, cfg_path = (os.path.join(folder, f) for f in ("encoder.pt", "weight_offsets.pt", "config.json"))
    enc = torch.load(enc_path, weights_only=True)

    def refused(match):
        with pytest.raises(CheckpointError, match=match) as err:
            e4t.load_e4t(folder)
        return str(err.value)

    os.rename(cfg_path, cfg_path + ".off")
    assert cfg_path in refused("config.json not found")
    os.rename(cfg_path + ".off", cfg_path)
    os.rename(enc_path, enc_path + ".off")
    assert folder in refused("no encoder file in")
    torch.save({k: v for k, v in enc.items() if k.startswith("clip_vision.")}, enc_path)
    refused("encoder.pt has no 'unet_feature_embedder.0.weight': not an E4T encoder")
    bad = dict(enc)
    bad["final_linear.bias"] = bad["final_linear.bias"].clone()
    bad["final_linear.bias"][1] = float("nan")
    torch.save(bad, enc_path)
    refused("encoder.pt: final_linear.bias holds NaN or Inf")
    torch.save(nn.Linear(2, 2), enc_path)  # a pickled module, not a state dict: weights_only refuses it
    assert enc_path in refused("(?s)could not read .*a pickle that is not a plain state dict")
    torch.save(enc, enc_path)
    os.remove(wo_path)
    assert folder in refused("no weight offsets in")
    with open(cfg_path, "w") as f:
        json.dump(["face"], f)
    refused("holds a list, not the training arguments")


def test_save_e4t_round_trip(tmp_path):
    w = e4t.load_e4t(tiny_e4t.write_tiny_e4t(str(tmp_path / "ref"), **SMALL))
    out = str(tmp_path / "ours")
    e4t.save_e4t(out, w.config.raw, w.head, w.offsets, w.clip_vision)
    assert sorted(os.listdir(out)) == ["config.json", "encoder.safetensors", "weight_offsets.safetensors"]
    back = e4t.load_e4t(out)
    assert back.config.raw == w.config.raw and back.config == w.config
    for a, b in ((back.head, w.head), (back.offsets, w.offsets)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.clip_vision.keys() == w.clip_vision.keys()
    assert all(torch.equal(back.clip_vision[k], w.clip_vision[k]) for k in w.clip_vision)


# ---------------------------------------------------------------------------------------------------------------
# Trainer on a toy host

WORD, CTX_LEN, TOY_CH, HIDDEN, N_IMAGES, N_VECTORS = 6, 4, 8, 5, 3, 4
TOY_TARGET = "toy.attn2.to_k"
TEMPLATES = ("a {placeholder_token}", "the {placeholder_token} here", "one {placeholder_token}")
SCHEDULE = NoiseSchedule(scaled_linear_alphas_cumprod(), "eps")


class ToyNet(nn.Module):
    """A frozen conv "denoiser" with one cross-attention-like key projection that the weight offsets change."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv_in = nn.Conv2d(4, TOY_CH, 3, padding=1)
            self.to_k = nn.Linear(WORD, TOY_CH)
            self.conv_out = nn.Conv2d(TOY_CH, 4, 3, padding=1)
            self.contexts = {p: torch.randn(CTX_LEN, WORD) for p in TEMPLATES}
        self.requires_grad_(False)


class ToyHost:
    def __init__(self, net, offsets):
        self.net, self.offsets, self.schedule, self.nan = net, offsets, SCHEDULE, False

    def __call__(self, x_t, t, ctx):
        w = e4t.apply_offset(self.net.to_k.weight, self.offsets[TOY_TARGET]())
        k = F.linear(ctx, w, self.net.to_k.bias).mean(1)
        h = F.silu(self.net.conv_in(x_t) + k[:, :, None, None] + torch.sin(t.float() / 100)[:, None, None, None])
        out = self.net.conv_out(h)
        return out * float("nan") if self.nan else out

    def features(self, x_t, t):
        h = self.net.conv_in(x_t)
        return e4t.pool_features([h, F.silu(h)])

    def encode(self, prompts, e):
        base = torch.stack([self.net.contexts[p] for p in prompts])
        return torch.cat([base[:, :1], e[:, None], base[:, 2:]], dim=1)  # e in the placeholder's slot


def toy_data():
    g = torch.Generator().manual_seed(11)
    return (torch.randn(N_IMAGES, 4, 8, 8, generator=g), torch.randn(N_IMAGES, N_VECTORS, HIDDEN, generator=g),
            torch.randn(WORD, generator=g))


def toy_modules(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = e4t.E4THead(2 * TOY_CH, HIDDEN, N_VECTORS, WORD)
    return head, e4t.OffsetSet({TOY_TARGET: (TOY_CH, WORD)}, seed=seed + 1)


def toy_trainer(net, head, offsets, **cfg):
    latents, clip_in, class_embed = toy_data()
    host = ToyHost(net, offsets)
    config = E4TTrainConfig(**{"steps": 6, "batch_size": 4, "reg_lambda": 0.05, "learning_rate": 1e-2, "seed": 5, "domain_embed_scale": 0.3,
                               "templates": TEMPLATES, "max_grad_norm": 0.0, **cfg})
    return E4TTrainer(host, host.features, host.encode, head, offsets, latents, clip_in, class_embed, config), host


def reference_loss(net, head, offsets, cfg):
    """tuning_e4t.py's step with the draws of the trainer re-derived in its order (image indices, t, eps, templates):
    mse(eps_hat, eps) + reg_lambda * sum(e^2), e = E(class) + scale * head(...)."""
    latents, clip_in, class_embed = toy_data()
    g = torch.Generator().manual_seed(cfg.seed)
    b = cfg.batch_size
    idx = torch.randint(0, N_IMAGES, (b,), generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    eps = torch.randn((b, 4, 8, 8), generator=g)
    prompts = [TEMPLATES[int(i)] for i in torch.randint(0, len(TEMPLATES), (b,), generator=g)]
    abar = scaled_linear_alphas_cumprod()[t].float()[:, None, None, None]
    x_t = abar.sqrt() * latents[idx] + (1 - abar).sqrt() * eps
    host = ToyHost(net, offsets)
    e = class_embed[None] + cfg.domain_embed_scale * head(clip_in[idx], host.features(x_t, t))
    diffusion = F.mse_loss(host(x_t, t, host.encode(prompts, e)), eps)
    return diffusion, cfg.reg_lambda * e.pow(2).sum()


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_trainer_loss_and_clipped_gradients(max_grad_norm):
    net = ToyNet()
    head, offsets = toy_modules()
    ref_head, ref_offsets = copy.deepcopy(head), copy.deepcopy(offsets)
    trainer, _ = toy_trainer(net, head, offsets, max_grad_norm=max_grad_norm)
    diffusion, reg = reference_loss(net, ref_head, ref_offsets, trainer.config)
    ref_params = list(ref_head.parameters()) + list(ref_offsets.parameters())
    grads = torch.autograd.grad(diffusion + reg, ref_params)
    losses = trainer.train_step()
    assert losses["diffusion"] == pytest.approx(float(diffusion.detach()), rel=1e-6)
    assert losses["reg"] == pytest.approx(float(reg.detach()), rel=1e-6) and float(reg.detach()) > 1e-3
    assert losses["total"] == pytest.approx(float((diffusion + reg).detach()), rel=1e-6)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = min(1.0, max_grad_norm / (float(norm) + 1e-6)) if max_grad_norm > 0 else 1.0
    if max_grad_norm > 0:
        assert float(norm) > 2 * max_grad_norm  # the clip is active
    own = [p.grad for p in list(head.parameters()) + list(offsets.parameters())]
    for got, want in zip(own, grads):
        close(got, want * scale, 1e-6)
    assert any(float(p.grad.abs().max()) > 0 for p in offsets.parameters())  # the offsets are trained


def test_nan_step_raises_and_changes_nothing():
    head, offsets = toy_modules()
    trainer, host = toy_trainer(ToyNet(), head, offsets)
    before = {k: v.clone() for k, v in {**head.state_dict(), **offsets.state_dict()}.items()}
    host.nan = True
    with pytest.raises(FloatingPointError, match="step 1: the loss or gradient is NaN or Inf.*not applied"):
        trainer.train_step()
    after = {**head.state_dict(), **offsets.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.step == 0 and trainer.history == [] and not trainer.optimizer.state
    host.nan = False
    trainer.train_step()
    assert trainer.step == 1 and not all(torch.equal(before[k], v) for k, v in {**head.state_dict(), **offsets.state_dict()}.items())


def test_resume_equals_an_uninterrupted_run(tmp_path):
    net = ToyNet()
    full, _ = toy_trainer(net, *toy_modules())
    full.train()
    part, _ = toy_trainer(net, *toy_modules())
    part.train(until=4)
    path = part.save(str(tmp_path / "e4t.state.safetensors"))
    resumed, _ = toy_trainer(net, *toy_modules(seed=7))  # other initial weights: all must come from the file
    resumed.load(path)
    assert resumed.step == 4
    resumed.train()
    assert resumed.step == 6 and resumed.history == full.history
    for name in ("head", "offsets"):
        a, b = full.modules[name].state_dict(), resumed.modules[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other_mode, _ = toy_trainer(net, *toy_modules(), mode="pretrain")
    with pytest.raises(ValueError, match="trained with mode='tune', this run has mode='pretrain'"):
        other_mode.load(path)
    other_batch, _ = toy_trainer(net, *toy_modules(), batch_size=2)
    with pytest.raises(ValueError, match="batch_size=4"):
        other_batch.load(path)
