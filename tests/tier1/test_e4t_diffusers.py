"""Tier 1: E4T's diffusers host (training/e4t_diffusers.py) against diffusers' and transformers' own forwards and
against the reference formulas re-stated here: the down + mid feature pass, ``W * (1 + dW)`` on q / k / v and its
gradient, the placeholder slot of the CLIP text encoder, the CLIP tower's open_clip <-> transformers keys and head
inputs, and the E4T training loop on this host (tuning steps lower the loss; resume is exact). fp32, 1e-5."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from comfyui_personalize.models import e4t
from comfyui_personalize.training import e4t_diffusers as host
from comfyui_personalize.training.diffusers_host import DiffusersDenoiser
from comfyui_personalize.training.e4t import E4TTrainConfig, E4TTrainer

CROSS = 16  # tiny_unet's cross-attention width = the tiny text encoder's
TEXT_LENGTH = 32
WORDS = ("face", "photo")  # one token each in the tiny tokenizer (the class word must be one token)
PH = host.PLACEHOLDER
TOL = 1e-5
# tiny open_clip-like ViT: 224 px, patch 14 (256 patches, 129 head inputs, as ViT-H-14), width 40, 3 layers, 4 heads
TINY_VISION = dict(hidden_size=40, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4, image_size=224,
                   patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5)


def write_tokenizer(folder, words=WORDS, length=TEXT_LENGTH):
    """A character-level CLIP BPE tokenizer with merges that make each of ``words`` one token; returns its vocab
    size."""
    from transformers import CLIPTokenizer

    os.makedirs(folder, exist_ok=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-_")
    vocab = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({w: i for i, w in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=length)
    tok.save_pretrained(folder)
    return len(vocab)


def tiny_text_encoder(vocab_size, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, hidden_size=CROSS, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def tiny_vision(seed=0, **overrides):
    """A tiny CLIPVisionModel whose weights are all perturbed (transformers' init leaves norms at 1 / 0)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    m = CLIPVisionModel(CLIPVisionConfig(**{**TINY_VISION, **overrides})).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name or "embedding" in name else 0.05))
    return m


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and a busy machine does not slow them down many times over
    (oversubscribed OpenMP threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def text_parts(tmp_path_factory):
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tok")
    n = write_tokenizer(str(folder))
    return CLIPTokenizer.from_pretrained(str(folder)), tiny_text_encoder(n)


def max_diff(a, b):
    return float((a.detach().double() - b.detach().double()).abs().max())


# ---------------------------------------------------------------------------------------------------------------
# UNet features


def test_unet_features_equal_diffusers_down_block_res_samples_and_mid(tiny_unet):
    """The feature pass equals the tensors diffusers' own UNet2DConditionModel.forward produces on the way down:
    conv_in's output, every down block's res samples, the mid block's output (taken with forward hooks)."""
    unet = tiny_unet(seed=3).eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, CROSS, generator=g)
    t = torch.tensor([17, 730])
    captured = []
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: captured.append(o.clone()))]
    hooks += [b.register_forward_hook(lambda m, i, o: captured.extend(s.clone() for s in o[1])) for b in unet.down_blocks]
    hooks.append(unet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o.clone())))
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=ctx)
        for h in hooks:
            h.remove()
        feats = host.unet_features(unet, x, t, ctx)
    # conv_in, down_blocks.0 (1 resnet + downsampler), down_blocks.1 (1 resnet, last level), mid
    assert [f.shape[1] for f in feats] == [f.shape[1] for f in captured] == [16, 16, 16, 32, 32]
    diffs = [max_diff(a, b) for a, b in zip(feats, captured)]
    assert max(diffs) < TOL, diffs
    assert host.feature_channels(unet) == 16 * 3 + 32 * 2
    # a timestep or a context change reaches the features (the comparison is not vacuous)
    with torch.no_grad():
        other = host.unet_features(unet, x, torch.tensor([400, 5]), ctx)
    assert max_diff(other[-1], feats[-1]) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Weight offsets


def test_offsets_equal_baked_weights_and_their_gradient(tiny_unet):
    """A UNet with attach_offsets equals a copy whose q / k / v weights were multiplied by (1 + dW) in place (whole
    UNet output); the gradient reaches every generator and equals autograd through W * (1 + dW) built explicitly
    (torch.func.functional_call on an untouched copy)."""
    unet = tiny_unet(seed=1).requires_grad_(False)  # frozen, as in pretraining: only the generators train
    shapes = host.offset_shapes(unet)
    # 4 transformer blocks (down 0, mid, up 1 x 2) x attn1/attn2 x q, k, v; attn2 k, v read the 16-wide context
    assert len(shapes) == 24 and all(n.endswith(("to_q", "to_k", "to_v")) for n in shapes)
    assert shapes["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"] == (16, CROSS)
    offsets = e4t.OffsetSet(shapes, seed=5)
    plain, baked, ref_unet = copy.deepcopy(unet), copy.deepcopy(unet), copy.deepcopy(unet)
    ref_offsets = copy.deepcopy(offsets)
    with torch.no_grad():
        mods = dict(baked.named_modules())
        for name, d in offsets.deltas().items():
            mods[name].weight.mul_(1 + d)
    host.attach_offsets(unet, offsets)
    g = torch.Generator().manual_seed(1)
    x, ctx, w = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, CROSS, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([3, 500])
    out = unet(x, t, encoder_hidden_states=ctx).sample
    with torch.no_grad():
        ref = baked(x, t, encoder_hidden_states=ctx).sample
        base = plain(x, t, encoder_hidden_states=ctx).sample
    assert max_diff(out, ref) < TOL, max_diff(out, ref)
    assert max_diff(out, base) > 1e-3  # the offsets change the output

    (out * w).sum().backward()
    ref_mods = dict(ref_unet.named_modules())
    params = {f"{n}.weight": ref_mods[n].weight * (1 + gen()) for n, gen in ref_offsets.items()}
    ref_out = torch.func.functional_call(ref_unet, params, (x, t), {"encoder_hidden_states": ctx}).sample
    (ref_out * w).sum().backward()
    worst = 0.0
    for (name, gen), (_, ref_gen) in zip(offsets.items(), ref_offsets.items()):
        for (pn, p), (_, rp) in zip(gen.named_parameters(), ref_gen.named_parameters()):
            assert p.grad is not None and float(p.grad.abs().max()) > 0, f"{name}.{pn} got no gradient"
            worst = max(worst, max_diff(p.grad, rp.grad) / max(float(rp.grad.abs().max()), 1e-12))
    assert worst < TOL, worst
    assert all(p.grad is None for p in unet.parameters())

    host.detach_offsets(unet)
    with torch.no_grad():
        assert max_diff(unet(x, t, encoder_hidden_states=ctx).sample, base) == 0.0


def test_offsets_refuse_what_is_not_a_projection(tiny_unet):
    unet = tiny_unet()
    with pytest.raises(ValueError, match=r"'conv_in': a Conv2d in the UNet, expected a Linear"):
        host.attach_offsets(unet, e4t.OffsetSet({"conv_in": (16, 4)}))
    with pytest.raises(ValueError, match="no such module"):
        host.attach_offsets(unet, e4t.OffsetSet({"down_blocks.9.attn1.to_q": (16, 16)}))
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    with pytest.raises(ValueError, match=r"is \(16, 8\) \(out, in\) but the UNet's projection is \(16, 16\)"):
        host.attach_offsets(unet, e4t.OffsetSet({name: (16, 8)}))
    assert not any(getattr(m, "_e4t_offset", False) for m in unet.modules())  # nothing attached
    from comfyui_personalize.training.diffusers_host import unet_lora

    unet_lora(unet, ["attn1.to_q"], 2, None, 0)
    with pytest.raises(ValueError, match="already computes with another weight function"):
        host.attach_offsets(unet, e4t.OffsetSet({name: (16, 16)}))


# ---------------------------------------------------------------------------------------------------------------
# Text


def manual_clip_text(te, embeds):
    """The CLIP text transformer re-stated (Radford et al. 2021; transformers' CLIPTextModel): + positions, per layer
    pre-LN causal multi-head attention and a QuickGELU MLP with residuals, final LayerNorm."""
    cfg = te.config
    sd = te.state_dict()
    B, L, D = embeds.shape
    heads = cfg.num_attention_heads
    x = embeds + sd["embeddings.position_embedding.weight"][:L]
    causal = torch.full((L, L), float("-inf")).triu(1)
    for n in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{n}."
        h = F.layer_norm(x, (D,), sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"], cfg.layer_norm_eps)
        q, k, v = (F.linear(h, sd[f"{p}self_attn.{c}_proj.weight"], sd[f"{p}self_attn.{c}_proj.bias"])
                   .reshape(B, L, heads, D // heads).transpose(1, 2) for c in "qkv")
        a = ((q @ k.transpose(-1, -2)) * (D // heads) ** -0.5 + causal).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, L, D), sd[p + "self_attn.out_proj.weight"], sd[p + "self_attn.out_proj.bias"])
        h = F.layer_norm(x, (D,), sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"], cfg.layer_norm_eps)
        h = F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
    return F.layer_norm(x, (D,), sd["final_layer_norm.weight"], sd["final_layer_norm.bias"], cfg.layer_norm_eps)


PROMPTS = ["a photo of {placeholder_token}", "{placeholder_token}, a photo", "the {placeholder_token} is a face"]


def test_slot_with_the_class_word_equals_the_prompt_written_out(text_parts):
    """The class word's embedding in the slot gives HF CLIPTextModel(input_ids)'s states of the prompt with the
    class word written out (the tokens around the slot are those of the whole prompt)."""
    tok, te = text_parts
    enc = host.SlotTextEncoder(tok, te)
    assert te.config.hidden_act == "quick_gelu"  # what manual_clip_text assumes
    e = enc.word_embedding("face").expand(len(PROMPTS), -1)
    with torch.no_grad():
        out = enc(PROMPTS, e)
        ids = tok([p.replace(PH, "face") for p in PROMPTS], padding="max_length", max_length=TEXT_LENGTH,
                  truncation=True, return_tensors="pt").input_ids
        ref = te(ids).last_hidden_state
    assert out.shape == (3, TEXT_LENGTH, CROSS)
    assert [enc.layout(p)[0] for p in PROMPTS] != ids.tolist()  # the slot's id differs, only its embedding matches
    assert max_diff(out, ref) < TOL, max_diff(out, ref)


def test_slot_with_any_vector_equals_inputs_embeds_and_passes_the_gradient(text_parts):
    """An arbitrary e in the slot equals the CLIP text transformer re-stated on inputs_embeds (the slot at the class
    marker's position of the tokenized prompt); the gradient reaches e and equals the re-stated one's."""
    tok, te = text_parts
    enc = host.SlotTextEncoder(tok, te)
    e = torch.randn(len(PROMPTS), CROSS, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(len(PROMPTS), TEXT_LENGTH, CROSS, generator=torch.Generator().manual_seed(3))
    out = enc(PROMPTS, e)
    (out * w).sum().backward()
    marker = tok.convert_tokens_to_ids("x</w>")  # a one-token word the prompts do not hold: where the slot is
    ids = tok([p.replace(PH, "x") for p in PROMPTS], padding="max_length", max_length=TEXT_LENGTH,
              return_tensors="pt").input_ids
    e_ref = e.detach().clone().requires_grad_(True)
    mask = (ids == marker).unsqueeze(-1)
    assert mask.sum() == len(PROMPTS)
    embeds = torch.where(mask, e_ref[:, None, :], te.get_input_embeddings().weight[ids].detach())
    ref = manual_clip_text(te, embeds)
    (ref * w).sum().backward()
    assert max_diff(out, ref) < TOL, max_diff(out, ref)
    assert bool((e.grad.abs().sum(dim=1) > 0).all())
    assert max_diff(e.grad, e_ref.grad) < TOL, max_diff(e.grad, e_ref.grad)
    assert all(p.grad is None for p in te.parameters())


def test_slot_text_encoder_errors(text_parts):
    tok, te = text_parts
    enc = host.SlotTextEncoder(tok, te)
    e = torch.zeros(1, CROSS)
    with pytest.raises(ValueError, match="holds 0 placeholders"):
        enc(["a photo of a face"], e)
    with pytest.raises(ValueError, match="holds 2 placeholders"):
        enc([f"{PH} and {PH}"], e)
    with pytest.raises(ValueError, match=r"tokens with the start, end and placeholder tokens; the text encoder takes 32"):
        enc([f"a photo of {PH} under a rainy sky on a cold winter evening"], e)
    with pytest.raises(ValueError, match="2 prompts need 2 word embeddings"):
        enc([PH, PH], e)
    with pytest.raises(ValueError, match=r"the class word 'dusk' is 4 tokens"):
        enc.word_embedding("dusk")
    assert torch.equal(enc.word_embedding("photo"), te.get_input_embeddings().weight[tok.convert_tokens_to_ids("photo</w>")])


# ---------------------------------------------------------------------------------------------------------------
# CLIP image tower


def open_clip_visual(sd, pixels, heads):
    """open_clip's VisionTransformer before v2.23 (mkshing's, ``proj = None``, ``output_tokens=True``) re-stated:
    patch conv, class token + positions, ln_pre, residual blocks (nn.MultiheadAttention on in_proj, GELU MLP),
    ``pooled = ln_post(x[:, 0])`` and the raw tokens ``x[:, 1:]``."""
    conv = sd["conv1.weight"]
    width = conv.shape[0]

    def ln(x, name):
        return F.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)

    x = F.conv2d(pixels, conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["class_embedding"].expand(x.shape[0], 1, -1), x], dim=1) + sd["positional_embedding"]
    x = ln(x, "ln_pre")
    n = 0
    while f"transformer.resblocks.{n}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{n}."
        h = ln(x, p + "ln_1").transpose(0, 1)
        a = F.multi_head_attention_forward(h, h, h, width, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
                                           None, None, False, 0.0, sd[p + "attn.out_proj.weight"],
                                           sd[p + "attn.out_proj.bias"], need_weights=False)[0]
        x = x + a.transpose(0, 1)
        h = F.gelu(F.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        n += 1
    return ln(x[:, 0], "ln_post"), x[:, 1:]


def open_clip_keys(layers):
    keys = {"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias", "ln_post.weight",
            "ln_post.bias"}
    for n in range(layers):
        keys |= {f"transformer.resblocks.{n}.{m}.{p}" for m in ("ln_1", "attn.out_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
                 for p in ("weight", "bias")}
        keys |= {f"transformer.resblocks.{n}.attn.in_proj_{p}" for p in ("weight", "bias")}
    return keys


def test_clip_tower_keys_round_trip_and_outputs(tmp_path):
    """transformers -> open_clip -> transformers gives the state dict back (both key layouts); the open_clip keys run
    through the re-stated open_clip forward give transformers' pooler_output and raw last_hidden_state; loaded into
    a fresh tower they give the same outputs; clip_vision_inputs is the pooled output and every second patch token
    of the preprocessed image."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model = tiny_vision(seed=4, image_size=56)
    sd = model.state_dict()
    oc = host.transformers_to_open_clip(sd)
    assert set(oc) == open_clip_keys(3)
    assert oc["transformer.resblocks.1.attn.in_proj_weight"].shape == (120, 40)
    back = host.open_clip_to_transformers(oc, prefix="")
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    prefixed = host.open_clip_to_transformers(oc)
    assert all(k.startswith("vision_model.") for k in prefixed)
    assert set(host.transformers_to_open_clip(prefixed)) == set(oc)  # either layout reads back

    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(pixel_values=pixels)
        pooled, tokens = open_clip_visual(oc, pixels, heads=4)
        assert max_diff(out.pooler_output, pooled) < TOL and max_diff(out.last_hidden_state[:, 1:], tokens) < TOL
        fresh = CLIPVisionModel(CLIPVisionConfig(**host.vision_config_from_open_clip(oc, heads=4))).eval()
        host.load_open_clip_tower(fresh, oc)
        again = fresh(pixel_values=pixels)
        assert torch.equal(again.last_hidden_state, out.last_hidden_state)

        images = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(6)) * 2 - 1
        inputs = host.clip_vision_inputs(model, images)
        ref_pooled, ref_tokens = open_clip_visual(oc, e4t.preprocess(images, 56), heads=4)
        ref = torch.cat([ref_pooled[:, None], ref_tokens[:, 1::2]], dim=1)
        assert inputs.shape == (2, e4t.n_clip_inputs(16), 40) == (2, 9, 40)
        assert max_diff(inputs, ref) < TOL, max_diff(inputs, ref)

    with pytest.raises(ValueError, match="no projection"):
        host.open_clip_to_transformers({**oc, "proj": torch.zeros(40, 8)})
    with pytest.raises(ValueError, match="does not fit the CLIP image tower"):
        host.load_open_clip_tower(tiny_vision(num_hidden_layers=2, image_size=56), oc)
    with pytest.raises(ValueError, match="cannot tell the attention heads"):
        host.vision_config_from_open_clip(oc)  # width 40: neither ViT-H's head width 80 nor open_clip's default 64


def test_clip_tower_matches_open_clip_itself():
    """The converted keys load strictly into open_clip's own VisionTransformer (proj None): its pooled output equals
    transformers' pooler_output, its tokens transformers' raw tokens (``final_ln_after_pool=True``, the layout before
    v2.23)."""
    transformer = pytest.importorskip("open_clip.transformer", reason="open_clip is not installed (optional reference)")
    model = tiny_vision(seed=7, image_size=56)
    oc = host.transformers_to_open_clip(model.state_dict())
    vit = transformer.VisionTransformer(image_size=56, patch_size=14, width=40, layers=3, heads=4, mlp_ratio=4.0,
                                        output_dim=8, output_tokens=True, final_ln_after_pool=True)
    vit.proj = None
    vit.load_state_dict(oc, strict=True)
    pixels = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        pooled, tokens = vit.eval()(pixels)
        out = model(pixel_values=pixels)
    assert max_diff(pooled, out.pooler_output) < TOL and max_diff(tokens, out.last_hidden_state[:, 1:]) < TOL


# ---------------------------------------------------------------------------------------------------------------
# The training loop on this host

# the reference's 15 tuning steps; a learning rate that moves a tiny random model visibly in them (the reference's
# 1.6e-5 is for a pretrained SD1.5: here the last-4 / first-4 loss ratio is 0.76 at 3e-3, 0.99 without learning)
TUNE_STEPS, TUNE_LR, TUNE_BATCH = 15, 3e-3, 4


def tune_trainer(tiny_unet, text_parts, steps=TUNE_STEPS, batch=TUNE_BATCH):
    """Tuning on the diffusers host, as the reference's tuning_e4t.py: 16 copies of one image, head + offsets + every
    UNet weight trained (plain requires_grad on this trainer's own UNet), clipping 1.0. Built from seeds: two calls
    give the same trainer."""
    from diffusers import DDPMScheduler

    tok, te = text_parts
    unet = tiny_unet(seed=11, block_out_channels=(8, 16), attention_head_dim=2)
    vision = tiny_vision(seed=12, image_size=28)
    text = host.SlotTextEncoder(tok, te)
    offsets = e4t.OffsetSet(host.offset_shapes(unet), seed=13)
    host.attach_offsets(unet, offsets)
    torch.manual_seed(14)
    head = e4t.E4THead(host.feature_channels(unet), 40, e4t.n_clip_inputs(4), CROSS)
    g = torch.Generator().manual_seed(15)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    latent = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        clip_in = host.clip_vision_inputs(vision, image)
        empty = text.plain([""])
    denoiser = DiffusersDenoiser.from_scheduler(unet, DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                     beta_end=0.012))

    def features(x_t, t):
        return e4t.pool_features(host.unet_features(unet, x_t, t, empty.expand(x_t.shape[0], -1, -1)))

    config = E4TTrainConfig(steps=steps, learning_rate=TUNE_LR, batch_size=batch, seed=3,
                            templates=("a photo of {placeholder_token}", "the photo of the {placeholder_token}"))
    return E4TTrainer(denoiser, features, text, head, offsets, latent.expand(batch, -1, -1, -1),
                      clip_in.expand(batch, -1, -1), text.word_embedding("face"), config, extra={"unet": unet})


def test_tuning_steps_lower_the_loss(tiny_unet, text_parts):
    """15 tuning steps (4 copies of one image, head + offsets + every UNet weight) lower the loss: the mean of the
    last 4 steps is below 0.85 x the first 4's (the same draws of t, noise and prompts without learning: 0.99)."""
    tr = tune_trainer(tiny_unet, text_parts)
    before = {k: v.detach().clone() for k, v in tr.modules["head"].state_dict().items()}
    tr.train()
    total = [h["total"] for h in tr.history]
    assert len(total) == TUNE_STEPS
    first, last = sum(total[:4]) / 4, sum(total[-4:]) / 4
    assert last < 0.85 * first, total
    assert all(not torch.equal(before[k], v) for k, v in tr.modules["head"].state_dict().items())


def test_resume_is_exact(tiny_unet, text_parts, tmp_path):
    """4 steps, save, load into a fresh trainer, 2 more: the same weights, optimizer state and losses as 6 straight."""
    straight = tune_trainer(tiny_unet, text_parts, steps=6, batch=2)
    straight.train()
    first = tune_trainer(tiny_unet, text_parts, steps=6, batch=2)
    first.train(4)
    first.save(str(tmp_path / "s.state.safetensors"))
    resumed = tune_trainer(tiny_unet, text_parts, steps=6, batch=2)
    resumed.load(str(tmp_path / "s.state.safetensors"))
    assert resumed.step == 4
    resumed.train()
    a, b = straight.state_tensors()[0], resumed.state_tensors()[0]
    assert sorted(a) == sorted(b) and any(k.startswith("unet.") for k in a) and any(k.startswith("offsets.") for k in a)
    worst = max(max_diff(a[k], b[k]) for k in a if k != "rng.torch")
    assert worst <= 1e-6, worst
    assert len(resumed.history) == len(straight.history) == 6
    assert all(r == pytest.approx(s, rel=1e-6) for r, s in zip(resumed.history, straight.history))
