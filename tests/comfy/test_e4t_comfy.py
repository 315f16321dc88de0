"""Tier 2: E4T inside a real ComfyUI (tiny SD1.5, mkshing-layout E4T folders with tiny widths): the loader reads the
reference's files (pickles and safetensors); the down+mid feature pass equals diffusers' ``down_block_res_samples +
(mid,)``; one UNet call with the baked offsets equals a diffusers UNet whose q/k/v were multiplied by (1 + dW); the
placeholder slot equals ComfyUI's own encode of the class word; the per-step embedding follows the latent and
replaces only the E4T rows; the tuning node runs under the executor's inference mode, never changes the source model,
and its files reload (the LoRA through the stock loader, the encoder through the loader); refusals."""
import json
import os

import pytest
import torch

STEPS = 2


@pytest.fixture(scope="module")
def env(comfy):
    maps = comfy.host.load_pack(comfy.repo_root)
    import folder_paths
    import nodes
    import tiny_e4t

    comfy.module("nodes.e4t").STATIC_LATENT_SIDE = 16  # the static features' latent (64 = 512 px): small on a CPU

    root = os.path.join(comfy.models_dir, "e4t")
    tiny_e4t.write_tiny_e4t(os.path.join(root, "tiny_face"), seed=0, fmt="pt")
    tiny_e4t.write_tiny_e4t(os.path.join(root, "tiny_face_st"), seed=0, fmt="safetensors")
    folder_paths.folder_names_and_paths["e4t"] = ([root], set(folder_paths.supported_pt_extensions))
    with torch.inference_mode():  # as the executor loads it: the weights are inference tensors
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sd15"]))[:3]
        e4t = maps["PersonalizeE4TLoader"]().load("tiny_face")[0]
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 96, 80, 3, generator=g)
    return maps, nodes, model, clip, vae, e4t, image


def unet_call(model, x, t, ctx):
    import comfy.model_management as mm

    with torch.inference_mode():
        mm.load_models_gpu([model])
        return model.model.diffusion_model(x, timesteps=t, context=ctx).float()


def test_loader_reads_the_reference_layout_in_both_formats(env, comfy, caplog):
    maps, _, _, _, _, e4t, _ = env
    import tiny_e4t

    assert e4t.head.n_inputs == 129 and e4t.head.word_dim == 48
    assert e4t.head.feature_channels == tiny_e4t.TINY_SD15_FEATURE_CHANNELS == 1088
    assert len(e4t.weights.offsets.names) == 96
    assert e4t.config.placeholder_token == "*s" and e4t.config.domain_class_token == "face"
    with torch.inference_mode(), caplog.at_level("WARNING"):
        st = maps["PersonalizeE4TLoader"]().load("tiny_face_st")[0]
    # the tower has no projection by design: ComfyUI's warning about exactly that key is not passed on
    assert "missing clip vision" not in caplog.text
    for (n, a), (m, b) in zip(e4t.deltas().items(), st.deltas().items(), strict=True):
        assert n == m and torch.equal(a, b)
    sd_a = e4t.clip_vision.model.state_dict()
    sd_b = st.clip_vision.model.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a if "visual_projection" not in k)
    assert "tiny_face" in maps["PersonalizeE4TLoader"].INPUT_TYPES()["required"]["e4t_name"][0]


def test_feature_pass_equals_diffusers_down_block_res_samples(env, comfy):
    _, _, model, clip, _, _, _ = env
    import comfy.model_management as mm
    import tiny_models

    unet = comfy.module("nodes.comfy.unet")
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10.0, 700.0]), torch.randn(2, 77, 48, generator=g)
    with torch.inference_mode():
        mm.load_models_gpu([model])
        ours = unet.down_mid_features(model.model.diffusion_model, x, t, ctx)
    dunet = tiny_models.to_diffusers_unet(model)
    captured = []
    hooks = [dunet.conv_in.register_forward_hook(lambda m, i, o: captured.append(o))]
    for block in dunet.down_blocks:
        hooks.append(block.register_forward_hook(lambda m, i, o: captured.extend(o[1])))
    hooks.append(dunet.mid_block.register_forward_hook(lambda m, i, o: captured.append(o)))
    with torch.no_grad():
        dunet(x, t, encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    assert len(ours) == len(captured) == 13
    assert sum(f.shape[1] for f in ours) == sum(unet.feature_channels(model)) == 1088
    for a, b in zip(ours, captured, strict=True):
        assert a.shape == b.shape and (a.float() - b).abs().max() < 1e-5


def test_one_unet_call_with_offsets_equals_diffusers_with_scaled_weights(env, comfy):
    _, _, model, clip, _, e4t, image = env
    import tiny_models

    node = comfy.module("nodes.e4t")
    with torch.inference_mode():
        patched, positive, negative, conditioner = node.apply_e4t(model, clip, e4t, node.image_pixels(image),
                                                                  "a photo of *s", "static")
    assert conditioner is None
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500.0]), torch.randn(1, 77, 48, generator=g)
    ours = unet_call(patched, x, t, ctx)
    base = unet_call(model, x, t, ctx)
    dunet = tiny_models.to_diffusers_unet(model)
    with torch.no_grad():
        for name, d in e4t.deltas().items():
            lin = dunet.get_submodule(name)
            lin.weight.mul_(1 + d)
        ref = dunet(x, t, encoder_hidden_states=ctx).sample
    assert (ours - base).abs().max() > 1e-3, "the offsets must change the model"
    assert (ours - ref).abs().max() < 1e-5
    assert torch.equal(unet_call(model, x, t, ctx), base), "the source model stays untouched"
    assert torch.equal(negative[0][0], clip.encode_from_tokens(clip.tokenize("")))


def test_placeholder_slot_equals_comfy_encode_of_the_class_word(env, comfy):
    _, _, _, clip, _, _, _ = env
    text = comfy.module("nodes.comfy.text")
    with torch.inference_mode():
        slot = text.SlotPrompt(clip, "a (close-up:1.2) photo of *s, smiling", "*s", 48)
        e = text.word_embedding_of(clip, "face", 48)[None]
        import comfy.model_management as mm

        mm.load_model_gpu(clip.patcher)
        ours = slot.encode(e)
        ref = clip.encode_from_tokens(clip.tokenize("a (close-up:1.2) photo of face, smiling"))
    assert ours.shape == ref.shape == (1, 77, 48)
    assert (ours.float() - ref.float()).abs().max() < 1e-5
    with pytest.raises(ValueError, match="once"):
        text.SlotPrompt(clip, "a photo of a face", "*s", 48)
    with pytest.raises(ValueError, match="one token"):
        text.word_embedding_of(clip, "photorealistic portrait", 48)


def test_per_step_embedding_follows_the_latent_and_replaces_only_its_rows(env, comfy):
    _, _, model, clip, _, e4t, image = env
    node = comfy.module("nodes.e4t")
    with torch.inference_mode():
        patched, positive, negative, cond = node.apply_e4t(model, clip, e4t, node.image_pixels(image), "a photo of *s",
                                                           "per_step")
    import comfy.model_management as mm

    seen = []

    def executor(x, t, context, *a, **k):
        seen.append(context.clone())
        return x

    executor.class_obj = patched.model.diffusion_model
    marker, empty = positive[0][0], negative[0][0]
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([900.0, 900.0])
    ctx = torch.cat([torch.cat([marker, marker], 1), torch.cat([empty, empty], 1)])  # 154 tokens: an LCM-tiled batch
    with torch.inference_mode():
        mm.load_models_gpu([patched, clip.patcher, e4t.head_patcher])
        cond(executor, x1, t, ctx, None, None, {"cond_or_uncond": [0, 1]})
        cond(executor, x2, t, ctx, None, None, {"cond_or_uncond": [0, 1]})
        e = comfy.module("nodes.comfy.wrappers").word_embedding(
            patched.model.diffusion_model, e4t.head_patcher.model, x1[:1], t[:1], cond.empty, cond.clip_inputs,
            cond.class_embed, cond.scale)
        expect = cond.prompt.encode(e.float())
    a, b = seen
    assert torch.equal(a[1], ctx[1]) and torch.equal(b[1], ctx[1]), "the negative row is left as it is"
    assert (a[0, :77] - expect[0]).abs().max() < 1e-5 and torch.equal(a[0, :77], a[0, 77:])
    assert (a[0] - ctx[0]).abs().max() > 1e-4, "the E4T row is re-encoded"
    assert (a[0] - b[0]).abs().max() > 1e-5, "the embedding follows the latent"
    assert cond.calls == 2
    with torch.inference_mode():  # the same context in a negative chunk (cond_or_uncond 1) is not the E4T prompt
        cond(executor, x1, t, torch.cat([ctx[:1], ctx[:1]]), None, None, {"cond_or_uncond": [1, 0]})
    assert torch.equal(seen[-1][0], ctx[0]) and not torch.equal(seen[-1][1], ctx[0])


def test_per_step_sampling_runs_and_differs_from_static(env, comfy):
    _, nodes, model, clip, _, e4t, image = env
    node = comfy.module("nodes.e4t")
    outs = {}
    for mode in ("per_step", "static"):
        with torch.inference_mode():
            patched, pos, neg, cond = node.apply_e4t(model, clip, e4t, node.image_pixels(image), "a photo of *s", mode)
            latent = {"samples": torch.zeros(1, 4, 16, 16)}
            outs[mode] = nodes.common_ksampler(patched, 1, 3, 5.0, "euler", "normal", pos, neg, latent)[0]["samples"]
        if cond is not None:
            assert cond.calls == 3  # one call per step (cond and uncond batched together)
    assert (outs["per_step"] - outs["static"]).abs().max() > 1e-5



def test_per_step_chains_with_other_packs_and_keeps_their_attention_patches_out_of_the_feature_pass(env, comfy):
    _, nodes, model, clip, _, e4t, image = env
    node = comfy.module("nodes.e4t")
    import comfy.patcher_extension as pe
    from comfy.ldm.modules.attention import optimized_attention

    seen = {"attn2": 0, "wrapper": 0}

    def other_pack_wrapper(executor, *args, **kwargs):  # another pack's diffusion-model wrapper (its own key)
        seen["wrapper"] += 1
        return executor(*args, **kwargs)

    def other_pack_attn2(q, k, v, extra_options):  # an IP-Adapter-like attn2 replace on one block
        seen["attn2"] += 1
        return optimized_attention(q, k, v, extra_options["n_heads"])

    base = model.clone()
    base.set_model_attn2_replace(other_pack_attn2, "input", 1)
    base.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "another_pack", other_pack_wrapper)
    with torch.inference_mode():
        patched, pos, neg, cond = node.apply_e4t(base, clip, e4t, node.image_pixels(image), "a photo of *s", "per_step")
        assert seen == {"attn2": 0, "wrapper": 0}, "the static feature pass runs a plain UNet"
        nodes.common_ksampler(patched, 1, 3, 5.0, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 16, 16)})
    assert cond.calls == 3
    assert seen["wrapper"] == 3, "the other pack's wrapper runs at every step"
    assert seen["attn2"] == 3, "the attention patch runs in the main pass only (cond + uncond batched), never in the feature pass"
    assert base.get_wrappers(pe.WrappersMP.DIFFUSION_MODEL, "personalize_e4t") == [], "the input model is not changed"


def tune(env, name, model=None, **kw):
    maps, _, base, clip, vae, e4t, image = env
    model = base if model is None else model
    args = dict(steps=STEPS, learning_rate=1e-3, batch_size=2, reg_lambda=1e-4,
                mode="reference (all UNet weights + offsets + encoder)", seed=1, save_name=name, resume=False,
                resolution=64)
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return maps["PersonalizeE4TTune"]().tune(model, clip, vae, e4t, image, **args)


@pytest.mark.parametrize("mode", ["reference (all UNet weights + offsets + encoder)",
                                  "light (offsets + LoRA + encoder; not the reference)"])
def test_tuning_never_changes_the_source_and_its_files_reload(env, comfy, mode):
    maps, nodes, model, clip, vae, e4t, image = env
    g = torch.Generator().manual_seed(4)
    x, t, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([300.0]), torch.randn(1, 77, 48, generator=g)
    before = unet_call(model, x, t, ctx)
    head_before = {k: v.clone() for k, v in e4t.head.state_dict().items()}
    name = "t2_e4t_" + ("ref" if mode.startswith("reference") else "light")
    tuned, tuned_e4t, lora_name, curve = tune(env, name, mode=mode)
    assert torch.equal(unet_call(model, x, t, ctx), before), "tuning must leave the input model untouched"
    assert all(torch.equal(v, head_before[k]) for k, v in e4t.head.state_dict().items())
    out_tuned = unet_call(tuned, x, t, ctx)
    assert (out_tuned - before).abs().max() > 1e-4
    with torch.inference_mode():
        loaded = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]
    assert (unet_call(loaded, x, t, ctx) - out_tuned).abs().max() < 1e-5, "the saved LoRA rebuilds the tuned UNet"
    assert any(not torch.equal(v, head_before[k]) for k, v in tuned_e4t.head.state_dict().items())
    import folder_paths

    folder = os.path.join(folder_paths.get_folder_paths("e4t")[0], name)
    with open(os.path.join(folder, "config.json")) as f:
        conf = json.load(f)
    assert conf["personalize_offsets_in_unet"] is True and conf["personalize_unet_lora"] == lora_name
    assert conf["pretrained_args"]["domain_class_token"] == "face"
    with torch.inference_mode():
        reloaded = maps["PersonalizeE4TLoader"]().load(name)[0]
    assert all(torch.equal(v, tuned_e4t.head.state_dict()[k]) for k, v in reloaded.head.state_dict().items())
    with torch.inference_mode():  # the tuned encoder goes with the tuned model, not the base one
        node = comfy.module("nodes.e4t")
        node.apply_e4t(tuned, clip, reloaded, node.image_pixels(image), "a photo of *s", "static")
        node.apply_e4t(loaded, clip, reloaded, node.image_pixels(image), "a photo of *s", "static")
        with pytest.raises(ValueError, match="tuned"):
            node.apply_e4t(model, clip, reloaded, node.image_pixels(image), "a photo of *s", "static")
    assert curve.shape[0] == 1 and curve.std() > 0


def test_tuning_resumes(env, comfy):
    full = tune(env, "t2_e4t_resume_a", steps=3)[1]
    tune(env, "t2_e4t_resume_b", steps=2)
    resumed = tune(env, "t2_e4t_resume_b", steps=3, resume=True)[1]
    for k, v in full.head.state_dict().items():
        assert (resumed.head.state_dict()[k] - v).abs().max() < 1e-6


def test_refusals(env, comfy):
    maps, nodes, model, clip, vae, e4t, image = env
    node = comfy.module("nodes.e4t")
    with torch.inference_mode():
        xl_model, xl_clip = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sdxl"]))[:2]
        with pytest.raises(ValueError, match="SD1.x"):
            node.apply_e4t(xl_model, xl_clip, e4t, node.image_pixels(image), "a photo of *s", "static")
        with pytest.raises(ValueError, match="placeholder"):
            node.apply_e4t(model, clip, e4t, node.image_pixels(image), "a photo of a face", "static")
        patched = node.apply_e4t(model, clip, e4t, node.image_pixels(image), "a photo of *s", "per_step")[0]
        with pytest.raises(ValueError, match="already"):
            node.apply_e4t(patched, clip, e4t, node.image_pixels(image), "a photo of *s", "per_step")
    with pytest.raises(ValueError, match="E4T Apply"):
        tune(env, "t2_e4t_refused", model=patched)
    static = node.apply_e4t(model, clip, e4t, node.image_pixels(image), "a photo of *s", "static")[0]
    with pytest.raises(ValueError, match="offsets already"):
        tune(env, "t2_e4t_refused", model=static)


def test_memory_estimate_parts_and_refusal(env, comfy):
    _, _, model, _, _, e4t, _ = env
    node = comfy.module("nodes.e4t")
    offsets = e4t.weights.offsets
    base = node.tuning_memory(model, 1000, offsets, 2, 64, False)
    assert set(base) == {"trainable state", "model weights", "activations", "weight copies", "offset graph"}
    assert base["trainable state"] == 16 * 1000
    assert base["activations"] == node.ACTIVATION_BYTES_PER_LATENT_PIXEL * 2 * 8 * 8
    assert node.tuning_memory(model, 1000, offsets, 4, 64, False)["activations"] == 2 * base["activations"]
    assert node.tuning_memory(model, 1000, offsets, 2, 64, False, "bf16")["activations"] == base["activations"] // 2
    ckpt = node.tuning_memory(model, 1000, offsets, 2, 64, True)
    assert ckpt["weight copies"] == 0 < base["weight copies"] and ckpt["activations"] == base["activations"] // 4
    need = sum(base.values())
    node.check_memory_fits(base, need, "tune", 1000)  # fits exactly: no error
    with pytest.raises(MemoryError, match="switch mode to light") as err:
        node.check_memory_fits(base, need - 1, "tune", 1000)
    assert "activations" in str(err.value) and "are free" in str(err.value)
    with pytest.raises(MemoryError, match="gradient_checkpointing") as err:
        node.check_memory_fits(base, need - 1, "tune-light", 1000)
    assert "switch mode" not in str(err.value)
