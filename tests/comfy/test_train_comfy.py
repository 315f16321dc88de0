"""Tier 2: the LoRA trainer inside a real ComfyUI (tiny SD1.5): training under the executor's inference mode, the
saved LoRA reloaded by the stock LoraLoaderModelOnly reproduces the trained model's output, the base model is left
untouched, resume continues the run, the interrupt leaves a usable LoRA and a resumable state; the [V] token is
trained through ComfyUI's own text encoder and saved where prompts find it as ``embedding:<name>``; SDXL too."""
import os

import pytest
import torch

STEPS = 3


@pytest.fixture(scope="module")
def env(comfy):
    maps = comfy.host.load_pack(comfy.repo_root)
    import nodes

    with torch.inference_mode():  # as the executor loads it: the weights are inference tensors
        ckpt = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sd15"]))
    model, clip, vae = ckpt[:3]
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        images = torch.rand(2, 64, 64, 3, generator=g)
    assert next(model.model.diffusion_model.parameters()).is_inference()
    return maps, nodes, model, clip, vae, images


def train(env, name, steps=STEPS, **kw):
    maps, _, model, clip, vae, images = env
    model = kw.pop("model", model)
    args = dict(subject_token="sks", class_word="dog", palp_prompts="a sketch of a dog\na dog in the snow",
                steps=steps, learning_rate=1e-2, rank=4, sude_weight=0.4, palp_weight=1.0, prior_weight=0.0, seed=1,
                save_name=name, resume=False, images=images, validation_steps=0)
    args.update(kw)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return maps["PersonalizeLoRATrainer"]().train(model, clip, vae, **args)


def apply(model, x, sigma, ctx):
    import comfy.model_management as mm

    with torch.inference_mode():
        mm.load_models_gpu([model])
        return model.model.apply_model(x, sigma, c_crossattn=ctx).float()


def test_trained_lora_reloads_exactly(env, comfy):
    maps, nodes, model, clip, vae, _ = env
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([3.0])
    with torch.inference_mode():
        ctx = clip.encode_from_tokens(clip.tokenize("a photo of sks dog"))
    base_before = apply(model, x, sigma, ctx)

    trained, lora_name, curve, val, clip_out, subject = train(env, "t2_lora", validate_every=2, validation_steps=2)
    assert lora_name == "t2_lora.safetensors"
    assert clip_out is clip and subject == "sks"
    import folder_paths
    assert lora_name in folder_paths.get_filename_list("loras")
    assert os.path.isfile(folder_paths.get_full_path("loras", lora_name))

    out_trained = apply(trained, x, sigma, ctx)
    loaded = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]
    out_loaded = apply(loaded, x, sigma, ctx)
    base_after = apply(model, x, sigma, ctx)
    assert (out_trained - base_after).abs().max() > 1e-4, "the LoRA must change the model"
    assert torch.allclose(out_loaded, out_trained, atol=1e-5, rtol=1e-5)
    assert torch.equal(base_before, base_after), "training must leave the input model untouched"
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.std() > 0
    assert val.shape[0] == 2 and val.shape[-1] == 3  # step 2 and the end


def test_the_training_forward_equals_the_exported_lora(env, comfy):
    """The trainer's own prediction (weight wrappers, LoRA on) equals the stock loader's model on the saved file."""
    maps, nodes, model, clip, vae, _ = env
    weights = comfy.module("nodes.comfy.weights")
    denoiser = comfy.module("nodes.comfy.denoiser")
    export = comfy.module("training.export")
    with torch.inference_mode(False):
        lora = weights.training_lora(model, ("attn1.to_q", "attn2.to_v", "attn2.to_out.0"), 4, 2.0, 0)
        with torch.no_grad():
            for _, d in lora.items():
                d.up.normal_(0, 0.1)
        den = denoiser.ComfyDenoiser(weights.attach_training_lora(model, lora))
        den.load()
        g = torch.Generator().manual_seed(1)
        x_t, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400])
        ctx = torch.randn(1, 77, 48, generator=g)
        with torch.no_grad():
            ours = den(x_t, t, ctx)
            with lora.disabled():
                off = den(x_t, t, ctx)
        sd = export.lora_to_comfy(lora)
    loaded = weights.model_with_lora(model, sd)
    sigma = den._sigmas[t]
    x = x_t * (1 + sigma ** 2).sqrt()
    ref = apply(loaded, x, sigma, ctx)
    base = apply(model, x, sigma, ctx)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(off, base, atol=1e-5, rtol=1e-5)
    assert (ours - off).abs().max() > 1e-3


def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradient(env, comfy):
    """ComfyUI's UNet runs a block's layers one by one (never the block's forward): checkpointing must wrap the layers.
    With it on, autograd keeps far fewer tensors, and the LoRA's gradient is the same."""
    _, _, model, _, _, _ = env
    weights = comfy.module("nodes.comfy.weights")
    denoiser = comfy.module("nodes.comfy.denoiser")
    with torch.inference_mode(False):
        lora = weights.training_lora(model, ("attn1.to_q", "attn2.to_v"), 4, 2.0, 0)
        with torch.no_grad():
            for _, d in lora.items():
                d.up.normal_(0, 0.1)
        den = denoiser.ComfyDenoiser(weights.attach_training_lora(model, lora))
        den.load()
        g = torch.Generator().manual_seed(1)
        x_t, t, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([400]), torch.randn(1, 77, 48, generator=g)
        grads, saved = [], []
        for on in (False, True):
            count = [0]

            def pack(x, count=count):
                count[0] += 1
                return x
            lora.zero_grad()
            with denoiser.gradient_checkpointing(den.patcher, on), torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                den(x_t, t, ctx).pow(2).mean().backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in lora.parameters() if p.grad is not None]))
            saved.append(count[0])
    assert saved[1] < saved[0] / 3, f"checkpointing saved {saved[1]} tensors, without {saved[0]}"
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)


@pytest.fixture
def one_thread():
    """Deterministic CPU kernels: with several threads, CPU BLAS / oneDNN reductions are not bit-reproducible from
    run to run (two uninterrupted runs differ in the last bits too, which Adam's first steps, ~lr * sign of the
    gradient, amplify to ~1e-3); one thread makes any two runs comparable bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_resume_continues_and_matches(env, comfy, one_thread):
    """1 step, stop, resume to 2 == 2 steps uninterrupted, bit for bit (LoRA and the trained token)."""
    import folder_paths
    import safetensors.torch as st

    kw = dict(palp_weight=1.0, train_token=True, token_learning_rate=5e-2)
    files = {}
    for name in ("t2_full", "t2_full_again"):
        train(env, name, steps=2, **kw)
        files[name] = st.load_file(folder_paths.get_full_path("loras", name + ".safetensors"))
        files[name]["token"] = st.load_file(folder_paths.get_full_path("embeddings", name + ".safetensors"))["emb_params"]
    train(env, "t2_half", steps=1, **kw)
    train(env, "t2_half", steps=2, resume=True, **kw)
    half = st.load_file(folder_paths.get_full_path("loras", "t2_half.safetensors"))
    half["token"] = st.load_file(folder_paths.get_full_path("embeddings", "t2_half.safetensors"))["emb_params"]
    full = files["t2_full"]
    assert full.keys() == half.keys()
    assert all(torch.equal(full[k], files["t2_full_again"][k]) for k in full), "runs must be deterministic"
    different = [k for k in full if not torch.equal(full[k], half[k])]
    assert not different, different[:5]


def test_interrupt_leaves_lora_and_state(env, comfy, caplog):
    """ComfyUI's own Cancel (the interrupt flag the executor's Cancel sets), raised at step 2 of 10; the log says
    which files hold the run."""
    import comfy.model_management as mm
    import comfy.utils as comfy_utils
    import folder_paths

    def cancel_at_two(value, total, preview=None, **kw):
        if value == 2:
            mm.interrupt_current_processing(True)

    before = comfy_utils.PROGRESS_BAR_HOOK
    comfy_utils.set_progress_bar_global_hook(cancel_at_two)
    try:
        with pytest.raises(mm.InterruptProcessingException), caplog.at_level("WARNING", logger="personalize"):
            train(env, "t2_cancel", steps=10, sude_weight=0.0, palp_weight=0.0)
    finally:
        comfy_utils.set_progress_bar_global_hook(before)
        mm.interrupt_current_processing(False)
    assert folder_paths.get_full_path("loras", "t2_cancel.safetensors") is not None
    state = os.path.join(folder_paths.get_output_directory(), "personalize_train", "t2_cancel.state.safetensors")
    assert os.path.isfile(state)
    export = comfy.module("training.export")
    assert export.load_state(state)[1]["step"] == 2  # stopped where Cancel was pressed
    said = [r.getMessage() for r in caplog.records if "cancelled at step 2 of 10" in r.getMessage()]
    assert len(said) == 1 and state in said[0] and folder_paths.get_full_path("loras", "t2_cancel.safetensors") in said[0]
    train(env, "t2_cancel", steps=3, resume=True, sude_weight=0.0, palp_weight=0.0)  # continues from step 2
    assert export.load_state(state)[1]["step"] == 3


def test_class_images_are_cached_per_model(env, comfy):
    """Generated class images are reused only by the model that made them: another checkpoint, or the same one with
    a LoRA on it, generates its own."""
    import glob

    import folder_paths

    maps, nodes, model, _, _, _ = env
    comfy.tiny.write_tiny_sd15(os.path.join(comfy.models_dir, "checkpoints", "t2_other_sd15.safetensors"), seed=1)
    with torch.inference_mode():
        other = nodes.CheckpointLoaderSimple().load_checkpoint("t2_other_sd15.safetensors")[0]
    with_lora = nodes.LoraLoaderModelOnly().load_lora_model_only(model, train(env, "t2_prior_lora", steps=1)[1], 1.0)[0]
    folder = os.path.join(folder_paths.get_output_directory(), "personalize_train")

    def generated(m, name):
        before = set(glob.glob(os.path.join(folder, "prior_*.safetensors")))
        train(env, name, steps=1, model=m, prior_weight=1.0, prior_count=2, sude_weight=0.0, palp_weight=0.0)
        return sorted(set(glob.glob(os.path.join(folder, "prior_*.safetensors"))) - before)

    import safetensors.torch as st

    (a,) = generated(model, "t2_prior_a")
    assert generated(model, "t2_prior_a_again") == []  # the same model reuses its class images
    (b,) = generated(other, "t2_prior_b")
    (c,) = generated(with_lora, "t2_prior_c")
    latents = [st.load_file(f)["latents"] for f in (a, b, c)]
    assert all(x.shape == (2, 4, 8, 8) for x in latents)
    assert (latents[0] - latents[1]).abs().max() > 1e-3 and (latents[0] - latents[2]).abs().max() > 1e-3


def test_bad_inputs(env):
    with pytest.raises(ValueError, match="clean"):
        train(env, "t2_bad", palp_prompts="a sketch of sks dog")
    with pytest.raises(ValueError, match="no subject images"):
        train(env, "t2_bad", images=None)
    with pytest.raises(FileNotFoundError, match="no saved state"):
        train(env, "t2_never_trained", resume=True)


def test_token_gradient_equals_transformers_clip(env, comfy):
    """The trainable token through ComfyUI's CLIP (our encoder) gives the same context and the same gradient as
    transformers' CLIPTextModel with the same weights, the token's vector placed at the token's position."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text = comfy.module("nodes.comfy.text")
    import folder_paths

    _, _, model, clip, _, _ = env
    tiny = comfy.tiny.TINY_TEXT_CLIP_L
    with torch.inference_mode(False):
        enc = text.ComfyTextEncoder(clip)
        assert enc.parts == [("l", tiny["hidden_size"])]
        init = enc.word_embedding("dog")
        path = os.path.join(folder_paths.get_folder_paths("embeddings")[0], "t2_grad.safetensors")
        enc.write_embedding(init, path)
        token = torch.nn.Parameter(init + 0.1 * torch.randn(init.shape, generator=torch.Generator().manual_seed(3)))
        prompt = "a photo of embedding:t2_grad dog"
        ours = enc([prompt], token)
        weights = torch.linspace(-1, 1, ours.numel()).reshape(ours.shape)
        (ours * weights).sum().backward()

        cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                             attention_dropout=0.0, dropout=0.0, **tiny)
        ref = CLIPTextModel(cfg).eval()
        inner = getattr(ref, "text_model", ref)  # transformers 5 dropped the text_model level
        prefix = "" if inner is ref else "text_model."
        sd = {prefix + k[len("text_model."):] if k.startswith("text_model.") else k: v.detach().clone()
              for k, v in clip.cond_stage_model.clip_l.transformer.state_dict().items()}
        missing, unexpected = ref.load_state_dict(sd, strict=False)
        assert not [k for k in missing if "position_ids" not in k], missing
        assert not [k for k in unexpected if "text_projection" not in k], unexpected  # ComfyUI keeps the projection
        tokens, slots = enc._slots(prompt)
        (_, _, pos, _), = slots
        ids = torch.tensor([[t if not torch.is_tensor(t) else 0 for t, *_ in tokens["l"][0]]])
        ref_token = torch.nn.Parameter(token.detach().clone())
        table = inner.embeddings.token_embedding
        hook = table.register_forward_hook(lambda m, i, o: torch.cat([o[:, :pos], ref_token[None].to(o), o[:, pos + 1:]], 1))
        try:
            expected = ref(input_ids=ids).last_hidden_state
        finally:
            hook.remove()
        (expected * weights).sum().backward()
    assert torch.allclose(ours, expected, atol=1e-5), float((ours - expected).abs().max())
    assert token.grad.abs().max() > 0
    assert torch.allclose(token.grad, ref_token.grad, atol=1e-5, rtol=1e-4), float((token.grad - ref_token.grad).abs().max())


def test_token_training_saves_an_embedding_prompts_use(env, comfy):
    """train_token: the token moves, the file is where ComfyUI's tokenizer finds it, ComfyUI's own encode of a
    prompt naming it equals what the trainer conditioned on, and resume restores it."""
    text = comfy.module("nodes.comfy.text")
    export = comfy.module("training.export")
    import folder_paths
    import safetensors.torch as st

    _, _, model, clip, _, _ = env
    out = train(env, "t2_tok", train_token=True, token_learning_rate=5e-2, sude_weight=0.4)
    assert out[5] == "embedding:t2_tok"
    path = folder_paths.get_full_path("embeddings", "t2_tok.safetensors")
    assert path is not None and "t2_tok.safetensors" in folder_paths.get_filename_list("embeddings")
    data = st.load_file(path)
    assert list(data) == ["emb_params"] and data["emb_params"].shape == (1, comfy.tiny.TINY_TEXT_CLIP_L["hidden_size"])
    with torch.inference_mode(False):
        enc = text.ComfyTextEncoder(clip)
        init = enc.word_embedding("dog")
        assert (data["emb_params"] - init).abs().max() > 1e-3, "the token must be trained"
        enc.write_embedding(data["emb_params"], path)
        ours = enc(["a photo of embedding:t2_tok dog"], data["emb_params"].clone())
    with torch.inference_mode():  # as a CLIPTextEncode node after training
        stock = clip.encode_from_tokens(clip.tokenize("a photo of embedding:t2_tok dog"))
    assert torch.allclose(ours, stock.float(), atol=1e-6)
    assert not torch.allclose(stock, clip.encode_from_tokens(clip.tokenize("a photo of dog dog")).float(), atol=1e-4)

    state, _ = export.load_state(os.path.join(folder_paths.get_output_directory(), "personalize_train",
                                              "t2_tok.state.safetensors"))
    assert torch.equal(state["token"], data["emb_params"])
    train(env, "t2_tok", steps=STEPS + 1, resume=True, train_token=True, token_learning_rate=5e-2)
    after = st.load_file(path)["emb_params"]
    assert (after - data["emb_params"]).abs().max() > 0, "resume continues training the token"
    with pytest.raises(ValueError, match="train_token"):
        train(env, "t2_tok", steps=STEPS + 2, resume=True)  # a token run cannot resume as LoRA-only


@pytest.fixture(scope="module")
def sdxl(comfy):
    import nodes

    with torch.inference_mode():
        ckpt = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sdxl"]))
        images = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    return ckpt[:3], images


def test_sdxl_lora_and_token(env, sdxl, comfy):
    """SDXL: the conditioning carries the pooled text + size vector; the saved LoRA reloads exactly with the stock
    loader; the token is saved as clip_l / clip_g and ComfyUI's own encode of it equals the trainer's."""
    maps, nodes = env[0], env[1]
    (model, clip, vae), images = sdxl
    import folder_paths
    import safetensors.torch as st

    text = comfy.module("nodes.comfy.text")
    denoiser = comfy.module("nodes.comfy.denoiser")
    with torch.inference_mode():
        out = maps["PersonalizeLoRATrainer"]().train(
            model, clip, vae, subject_token="sks", class_word="dog", palp_prompts="a sketch of a dog", steps=2,
            learning_rate=1e-2, rank=4, sude_weight=0.4, palp_weight=1.0, prior_weight=0.0, seed=0,
            save_name="t2_xl", resume=False, images=images, validation_steps=2, train_token=True,
            token_learning_rate=5e-2)
    trained, lora_name, _, val, _, subject = out
    assert val.shape[1:3] == images.shape[1:3]
    data = st.load_file(folder_paths.get_full_path("embeddings", "t2_xl.safetensors"))
    tiny = comfy.tiny
    assert {k: tuple(v.shape) for k, v in data.items()} == {"clip_g": (1, tiny.TINY_TEXT_CLIP_G["hidden_size"]),
                                                            "clip_l": (1, tiny.TINY_TEXT_CLIP_L["hidden_size"])}
    with torch.inference_mode():
        cond, pooled = clip.encode_from_tokens(clip.tokenize(f"a photo of {subject} dog"), return_pooled=True)
        y = model.model.encode_adm(pooled_output=pooled, width=64, height=64)
    with torch.inference_mode(False):
        enc = text.ComfyTextEncoder(clip, adm=denoiser.sdxl_size_conditioning(model, torch.zeros(1, 4, 8, 8)))
        vec = torch.cat([data[f"clip_{k}"] for k, _ in enc.parts], 1)
        enc.write_embedding(vec, folder_paths.get_full_path("embeddings", "t2_xl.safetensors"))
        ours_c, ours_y = enc([f"a photo of {subject} dog"], vec)
    assert torch.allclose(ours_c, cond.float(), atol=1e-6) and torch.allclose(ours_y, y.float(), atol=1e-6)

    import comfy.model_management as mm
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    loaded = nodes.LoraLoaderModelOnly().load_lora_model_only(model, lora_name, 1.0)[0]
    outs = []
    for m in (trained, loaded, model):
        with torch.inference_mode():
            mm.load_models_gpu([m])
            outs.append(m.model.apply_model(x, torch.tensor([3.0]), c_crossattn=cond, y=y).float())
    assert (outs[0] - outs[2]).abs().max() > 1e-4, "the LoRA must change the model"
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_validation_shows_live_previews_and_moves_the_progress_bar(env, comfy):
    """Each validation sample reaches the node as a preview picture while training runs, and the progress bar counts
    the validation's sampling steps (it does not stand still). The files get the user's umask, as ComfyUI's own
    outputs (mkstemp's 0600 would hide them from another process)."""
    import comfy.utils as comfy_utils
    from PIL import Image

    calls = []
    before = comfy_utils.PROGRESS_BAR_HOOK
    comfy_utils.set_progress_bar_global_hook(lambda value, total, preview=None, **kw: calls.append((value, total, preview)))
    try:
        train(env, "t2_previews", steps=2, sude_weight=0.0, palp_weight=0.0, validate_every=1, validation_steps=3)
    finally:
        comfy_utils.set_progress_bar_global_hook(before)
    import stat

    import folder_paths
    mask = os.umask(0)
    os.umask(mask)
    state = os.path.join(folder_paths.get_output_directory(), "personalize_train", "t2_previews.state.safetensors")
    for path in (folder_paths.get_full_path("loras", "t2_previews.safetensors"), state):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, f"{path}: not the user's umask (as ComfyUI's outputs)"
    previews = [p for _, _, p in calls if p is not None]
    assert len(previews) == 2  # after step 1 (mid-run) and at the end
    assert all(fmt == "JPEG" and isinstance(img, Image.Image) and img.size[0] >= 8 for fmt, img, _ in previews)
    during = [(v, t) for v, t, p in calls if t == 3 and p is None]
    assert during == [(1, 3), (2, 3), (3, 3)] * 2, calls
