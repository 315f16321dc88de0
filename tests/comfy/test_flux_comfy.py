"""Tier 2: PuLID-FLUX and the XLabs IP-Adapter inside a real ComfyUI, on a tiny Flux (ComfyUI's own ``Flux`` class,
3 double + 5 single blocks) loaded by ``CheckpointLoaderSimple``, sampled by ComfyUI's KSampler:
- the XLabs hook path equals diffusers' XLabs IP-Adapter on the same weights (``tiny_flux.to_diffusers_flux``), the
  reference run inside the same sampler through a DIFFUSION_MODEL wrapper;
- the PuLID-FLUX hook path equals the official loop re-stated on ComfyUI's blocks (ToTheBeginning/PuLID
  ``flux/model.py``: the start step by index, the IDFormer of zeros on the negative pass under true CFG);
- a foreign ``dit`` replace keeps running, clones do not leak into the source model, the model sampled again after the
  PuLID node is removed gives the bare result bit for bit, and what cannot work is refused with a clear error.
"""
import os
import types

import pytest
import safetensors.torch
import tiny_flux
import torch
from einops import rearrange
from flux_reference import reference_ca
from node_runner import inference_nodes

TOL = 1e-5
STEPS = 4


@pytest.fixture(scope="module")
def env(comfy):
    maps = comfy.load_pack()
    import folder_paths
    import nodes

    d = comfy.models_dir
    tiny_flux.write_tiny_flux(os.path.join(d, "checkpoints", "tiny_flux_test.safetensors"))
    tiny_flux.write_tiny_pulid_flux(os.path.join(d, "pulid", "tiny_pulid_flux_v0.9.1.safetensors"), seed=2)
    xlabs_path = os.path.join(d, "ipadapter", "tiny_xlabs_4.safetensors")
    for tokens in (4, 16):
        tiny_flux.write_tiny_xlabs(os.path.join(d, "ipadapter", f"tiny_xlabs_{tokens}.safetensors"), tokens, seed=3)
    for name in ("pulid", "ipadapter"):
        folder_paths.add_model_folder_path(name, os.path.join(d, name))
    for name in ("pulid", "ipadapter", "checkpoints"):
        folder_paths.filename_list_cache.pop(name, None)
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint("tiny_flux_test.safetensors")
        pos = nodes.CLIPTextEncode().encode(clip, "a portrait photo")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
        clip_l = nodes.CLIPVisionLoader().load_clip(os.path.basename(comfy.files["clip_vision_vit-l"]))[0]
    pulid_mod = comfy.module("models.pulid")
    g = torch.Generator().manual_seed(7)
    embeds = pulid_mod.PuLIDEmbeds(torch.randn(2, 528, generator=g), [torch.randn(2, 577, 64, generator=g) for _ in range(5)])
    load = lambda node, name: maps[node]().load(name)[0]  # noqa: E731
    # node functions run under inference mode, as ComfyUI's executor runs them
    nodes_ = inference_nodes(maps)
    return types.SimpleNamespace(
        maps=nodes_, model=model, xlabs_path=xlabs_path, vae=vae, pos=pos, neg=neg, clip_l=clip_l, embeds=embeds,
        pulid=load("PersonalizePuLIDLoader", "tiny_pulid_flux_v0.9.1.safetensors"),
        xlabs=load("PersonalizeIPAdapterLoader", "tiny_xlabs_4.safetensors"),
        xlabs16=load("PersonalizeIPAdapterLoader", "tiny_xlabs_16.safetensors"),
        image=torch.rand(2, 80, 96, 3, generator=g))


def sample(env, model, cfg=1.0, seed=3, size=(48, 64)):
    import nodes

    latent = {"samples": torch.zeros(1, 16, size[0] // 8, size[1] // 8)}
    with torch.inference_mode():
        return nodes.KSampler().sample(model, seed, STEPS, cfg, "euler", "simple", env.pos, env.neg, latent)[0]["samples"]


def with_reference(model, forward):
    """A clone of the bare ``model`` whose diffusion model call is ``forward(dm, x, timestep, context, y, guidance,
    transformer_options)`` (a DIFFUSION_MODEL wrapper that does not call the executor)."""
    import comfy.patcher_extension as pe

    def wrapper(executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                transformer_options=None, **kwargs):
        return forward(executor.class_obj, x, timestep, context, y, guidance, transformer_options)
    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "test.reference", wrapper)
    return m


def patchify(x):
    return rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpatchify(out, x):
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)


def image_ids(x):
    h, w = x.shape[-2] // 2, x.shape[-1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None]
    return ids.reshape(-1, 3)


# ---------------------------------------------------------------------------------------------------------------


def test_the_files_load_and_are_told_apart_by_their_keys(env):
    dm = env.model.model.diffusion_model
    assert type(dm).__name__ == "Flux" and (len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size) == (3, 5, 96)
    assert env.pulid.model.spec.layout == "flux" and env.pulid.model.spec.modules == 4
    assert (env.xlabs.spec.family, env.xlabs.spec.tokens, env.xlabs16.spec.tokens) == ("xlabs-flux", 4, 16)


def test_xlabs_through_the_sampler_equals_diffusers(env):
    import comfy.model_management as mm
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor  # noqa: F401

    weight = 0.7
    patched = env.maps["PersonalizeIPAdapterFluxApply"]().apply(env.model, env.xlabs, weight, 0.0, 1.0, "concat",
                                                                 image=env.image, clip_vision=env.clip_l)[0]
    with torch.inference_mode():
        mm.load_model_gpu(env.model)
        ref = tiny_flux.to_diffusers_flux(env.model.model.diffusion_model)
        sd = {k: v.float() for k, v in safetensors.torch.load_file(env.xlabs_path).items()}  # the file's (bf16) values
    parts = {"image_proj": {}, "ip_adapter": {}}
    for k, v in sd.items():  # diffusers' loader renames (FluxIPAdapterMixin.load_ip_adapter)
        rest = k.split(".", 1)[1]
        if k.startswith("ip_adapter_proj_model."):
            parts["image_proj"][rest] = v
        else:
            parts["ip_adapter"][rest.replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                                .replace("ip_adapter_double_stream_v_proj", "to_v_ip").replace("processor.", "")] = v
    ref._load_ip_adapter_weights([parts], low_cpu_mem_usage=False)
    for proc in ref.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [weight]
    with torch.inference_mode():
        cond = env.clip_l.encode_image(env.image)["image_embeds"].float()
        black = env.clip_l.encode_image(torch.zeros_like(env.image[:1]))["image_embeds"].float()

    def forward(dm, x, timestep, context, y, guidance, to):
        rows = [black.expand(cond.shape[0], -1) if c == 1 else cond for c in to["cond_or_uncond"]]
        embeds = torch.stack([r for r in rows for _ in range(x.shape[0] // len(rows))])
        out = ref(hidden_states=patchify(x), encoder_hidden_states=context, pooled_projections=y, timestep=timestep,
                  guidance=guidance, img_ids=image_ids(x), txt_ids=torch.zeros(context.shape[1], 3),
                  joint_attention_kwargs={"ip_adapter_image_embeds": [embeds]}, return_dict=False)[0]
        return unpatchify(out, x)
    for cfg in (1.0, 2.5):
        got, want, bare = sample(env, patched, cfg), sample(env, with_reference(env.model, forward), cfg), sample(env, env.model, cfg)
        assert (want - bare).abs().max() > 1e-2
        assert (got - want).abs().max() < TOL * max(1.0, float(want.abs().max()))


def pulid_reference(env, weight, start_step, mode_index=0):
    """The official PuLID-FLUX forward (flux/model.py) re-stated on ComfyUI's blocks, the ID gated by the step index."""
    from comfy.ldm.flux.layers import timestep_embedding

    pulid = env.pulid.model
    sd = {f"pulid_ca.{k}": v for k, v in pulid.pulid_ca.state_dict().items()}
    e = env.embeds
    with torch.inference_mode():
        enc = pulid.pulid_encoder.float()
        cond = enc(e.id_cond[:1], [h[:1] for h in e.hidden])
        uncond = enc(torch.zeros_like(e.id_cond[:1]), [torch.zeros_like(h[:1]) for h in e.hidden])
    heads = pulid.spec.heads

    def forward(dm, x, timestep, context, y, guidance, to):
        step = int((to["sample_sigmas"] == timestep[0]).nonzero()[0])
        per_chunk = x.shape[0] // len(to["cond_or_uncond"])
        ids = torch.cat([(uncond if c == 1 else cond).expand(per_chunk, -1, -1) for c in to["cond_or_uncond"]])
        use = step >= start_step
        img, img_ids = dm.process_img(x)
        txt_ids = torch.zeros(x.shape[0], context.shape[1], 3)
        img = dm.img_in(img)
        vec = dm.time_in(timestep_embedding(timestep, 256).to(img.dtype))
        vec = vec + dm.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + dm.vector_in(y)
        txt = dm.txt_in(context)
        pe = dm.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        k = 0
        for i, block in enumerate(dm.double_blocks):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
            if i % 2 == 0 and use:
                img = img + weight * reference_ca(sd, k, ids, img, heads)
                k += 1
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(dm.single_blocks):
            xs = block(img, vec=vec, pe=pe)
            real, t = xs[:, txt.shape[1]:], xs[:, :txt.shape[1]]
            if i % 4 == 0 and use:
                real = real + weight * reference_ca(sd, k, ids, real, heads)
                k += 1
            img = torch.cat((t, real), 1)
        out = dm.final_layer(img[:, txt.shape[1]:], vec)
        return unpatchify(out, x)
    return forward


@pytest.mark.parametrize("cfg, start_step", [(1.0, 0), (2.5, 2)])
def test_pulid_flux_through_the_sampler_equals_the_official_loop(env, cfg, start_step):
    weight = 0.9
    patched, info = env.maps["PersonalizePuLIDFluxApply"]().apply(env.model, env.pulid, env.embeds, weight, start_step,
                                                                  0.0, 1.0, "first (official)")
    assert "after 4 blocks" in info
    got, bare = sample(env, patched, cfg), sample(env, env.model, cfg)
    want = sample(env, with_reference(env.model, pulid_reference(env, weight, start_step)), cfg)
    assert (want - bare).abs().max() > 1e-2
    assert (got - want).abs().max() < TOL * max(1.0, float(want.abs().max()))


def test_the_start_step_gate_and_the_window(env):
    apply = env.maps["PersonalizePuLIDFluxApply"]().apply
    bare = sample(env, env.model)
    late = sample(env, apply(env.model, env.pulid, env.embeds, 1.0, STEPS, 0.0, 1.0, "first (official)")[0])
    assert torch.equal(late, bare)  # start_step = steps: never acts
    never = sample(env, apply(env.model, env.pulid, env.embeds, 1.0, 0, 1.0, 1.0, "first (official)")[0])
    assert (never - bare).abs().max() < 1e-3 * float(bare.abs().max())  # start_at = end_at = 1: at most the last sigma


def test_a_foreign_block_replace_keeps_running_and_clones_do_not_leak(env):
    calls = []

    def foreign(args, extra):  # another pack's replace: runs the block, counts its calls
        calls.append(args["img"].shape)
        return extra["original_block"](args)
    other = env.model.clone()
    other.set_model_patch_replace(foreign, "dit", "double_block", 2)
    other.set_model_patch_replace(foreign, "dit", "single_block", 0)
    apply = env.maps["PersonalizePuLIDFluxApply"]().apply
    plain = sample(env, apply(env.model, env.pulid, env.embeds, 1.0, 0, 0.0, 1.0, "first (official)")[0])
    both = apply(other, env.pulid, env.embeds, 1.0, 0, 0.0, 1.0, "first (official)")[0]
    calls.clear()
    chained = sample(env, both)
    assert len(calls) == 2 * STEPS  # the foreign replace ran at both keys in every model call
    assert torch.equal(chained, plain)  # ... before PuLID's cross-attention, which saw its output
    dit = other.model_options["transformer_options"]["patches_replace"]["dit"]
    assert dit[("double_block", 2)] is foreign  # the source model keeps its own patches, untouched
    assert "dit" not in env.model.model_options.get("transformer_options", {}).get("patches_replace", {})
    late = both.clone()  # a node after ours that overwrites the key of double block 0, where our hook takes the text length
    late.set_model_patch_replace(foreign, "dit", "double_block", 0)
    overwritten = sample(env, late)  # the single blocks still find the image tokens (the text length of the context)
    assert (overwritten - sample(env, env.model)).abs().max() > 1e-2 and torch.isfinite(overwritten).all()
    stacked = env.maps["PersonalizeIPAdapterFluxApply"]().apply(both, env.xlabs, 0.7, 0.0, 1.0, "concat", image=env.image,
                                                                clip_vision=env.clip_l)[0]
    hooks = stacked.model_options["transformer_options"]["patches_replace"]["dit"]
    assert len(hooks[("double_block", 2)].entries) == 2 and len(both.model_options["transformer_options"]["patches_replace"]
                                                                 ["dit"][("double_block", 2)].entries) == 1


def test_removing_the_node_restores_the_bare_model_bit_for_bit(comfy, env, tmp_path):
    import execution
    import folder_paths

    path = os.path.join(folder_paths.get_input_directory(), "flux_test.pulidembeds.safetensors")
    env.embeds.save(path)
    base = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_flux_test.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": 5, "steps": 3, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["2", 0],
                                                   "negative": ["2", 0], "latent_image": ["3", 0], "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "flux_bitwise/run"}},
    }
    with_pulid = {**base,
                  "7": {"class_type": "PersonalizePuLIDLoader", "inputs": {"pulid_file": "tiny_pulid_flux_v0.9.1.safetensors"}},
                  "8": {"class_type": "PersonalizePuLIDLoadEmbeds", "inputs": {"embeds_file": os.path.basename(path)}},
                  "9": {"class_type": "PersonalizePuLIDFluxApply", "inputs": {
                      "model": ["1", 0], "pulid": ["7", 0], "embeds": ["8", 0], "weight": 1.0, "start_step": 0,
                      "start_at": 0.0, "end_at": 1.0, "images": "first (official)"}}}
    with_pulid["5"] = {**base["5"], "inputs": {**base["5"]["inputs"], "model": ["9", 0]}}
    executor = execution.PromptExecutor(comfy.host.StubServer(), cache_type=False)
    latents = []
    for prompt in (base, with_pulid, base):
        result = comfy.host.run_prompt(prompt, executor=executor)
        files = result["outputs"]["6"]["latents"]
        latents.append(safetensors.torch.load_file(os.path.join(folder_paths.get_output_directory(), files[0]["subfolder"],
                                                                files[0]["filename"]))["latent_tensor"])
    assert not torch.equal(latents[0], latents[1])
    assert torch.equal(latents[0], latents[2])


def test_what_cannot_work_is_refused(comfy, env):
    import nodes

    flux_apply = env.maps["PersonalizePuLIDFluxApply"]().apply
    with torch.inference_mode():
        sdxl = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sdxl"]))[0]
    with pytest.raises(ValueError, match="not Flux"):
        flux_apply(sdxl, env.pulid, env.embeds, 1.0, 0, 0.0, 1.0, "first (official)")
    with pytest.raises(ValueError, match="PuLID-FLUX model: use 'Apply PuLID-FLUX"):
        env.maps["PersonalizePuLIDApply"]().apply(sdxl, env.pulid, env.embeds, "fidelity", 0.8, 0.0, 1.0)
    with pytest.raises(ValueError, match="use 'Apply IP-Adapter Flux"):
        env.maps["PersonalizeIPAdapterApply"]().apply(sdxl, env.xlabs, 1.0, "linear", 0.0, 1.0, "concat", "V only",
                                                      image=env.image, clip_vision=env.clip_l)
    hijacked = env.model.clone()
    hijacked.add_object_patch("diffusion_model.forward_orig", lambda *a, **k: None)
    with pytest.raises(ValueError, match="object patch"):
        flux_apply(hijacked, env.pulid, env.embeds, 1.0, 0, 0.0, 1.0, "first (official)")

    import comfy.patcher_extension as pe

    bypass = env.maps["PersonalizeIPAdapterFluxApply"]().apply(env.model, env.xlabs, 1.0, 0.0, 1.0, "concat",
                                                               image=env.image, clip_vision=env.clip_l)[0]

    def elsewhere(executor, x, *args, **kwargs):  # a pack that runs its own implementation (nunchaku-like)
        return torch.zeros_like(x)
    bypass.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "zz.other", elsewhere)
    with pytest.raises(Exception, match="without calling ComfyUI's block hooks"):
        sample(env, bypass)


def test_masks_reach_the_image_tokens_and_two_identities_stack(env):
    apply = env.maps["PersonalizePuLIDFluxApply"]().apply
    bare = sample(env, env.model)
    left = torch.zeros(1, 48, 64)
    left[:, :, :32] = 1.0
    args = (env.pulid, env.embeds, 1.0, 0, 0.0, 1.0, "first (official)")
    off = sample(env, apply(env.model, *args, attn_mask=torch.zeros(1, 48, 64))[0])
    assert torch.equal(off, bare)  # a black mask: the delta is zero on every image token
    one = apply(env.model, *args, attn_mask=left)[0]
    two = apply(one, env.pulid, env.embeds.__class__(env.embeds.id_cond.flip(0), [h.flip(0) for h in env.embeds.hidden]),
                1.0, 0, 0.0, 1.0, "first (official)", attn_mask=1.0 - left)[0]
    full = sample(env, apply(env.model, *args)[0])
    s_one, s_two = sample(env, one), sample(env, two)
    assert (s_one - bare).abs().max() > 1e-3 and (s_one - full).abs().max() > 1e-3 and (s_two - s_one).abs().max() > 1e-3
    hooks = two.model_options["transformer_options"]["patches_replace"]["dit"]
    assert len(hooks[("single_block", 4)].entries) == 2


def test_chroma_takes_pulid_flux_and_refuses_xlabs(env):
    """Chroma (ComfyUI's own class, same double / single block loop and hooks; modulations from its approximator)."""
    import comfy.model_detection
    import comfy.model_patcher
    import nodes

    cfg = dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=44, hidden_size=96, mlp_ratio=4.0,
               num_heads=3, depth=3, depth_single_blocks=5, axes_dim=[4, 14, 14], theta=10000, patch_size=2, qkv_bias=True,
               in_dim=64, out_dim=96, hidden_dim=64, n_layers=2)
    config = comfy.model_detection.model_config_from_unet_config(cfg)
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    tiny_flux.tiny_models._init_module(base.diffusion_model, 5, gain_for=tiny_flux._flux_gain)
    chroma = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 10, 44, generator=g), {"pooled_output": torch.zeros(1, 48)}]]
    latent = {"samples": torch.zeros(1, 16, 6, 8)}

    def run(m, cfg_scale):
        with torch.inference_mode():
            return nodes.KSampler().sample(m, 1, 3, cfg_scale, "euler", "simple", cond, cond, latent)[0]["samples"]
    patched, info = env.maps["PersonalizePuLIDFluxApply"]().apply(chroma, env.pulid, env.embeds, 1.0, 0, 0.0, 1.0,
                                                                  "first (official)")
    assert "trained on Flux.1-dev, not Chroma" in info
    assert (run(patched, 1.0) - run(chroma, 1.0)).abs().max() > 1e-2 and torch.isfinite(run(patched, 2.0)).all()
    with pytest.raises(ValueError, match="no per-block modulation"):
        env.maps["PersonalizeIPAdapterFluxApply"]().apply(chroma, env.xlabs, 1.0, 0.0, 1.0, "concat", image=env.image,
                                                          clip_vision=env.clip_l)
