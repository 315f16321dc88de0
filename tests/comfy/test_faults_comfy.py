"""Tier 2: the pack under bad input and faults inside a real ComfyUI: linked and NaN widget values through the
executor, NaN tensors, saved files that advance, listings that never follow links, folders that stay in the input
folder, files the pack did not write, wrong companions, frontend rounding of small floats."""
import math
import os
import time
import types

import numpy as np
import pytest
import tiny_adapters
import torch
from PIL import Image

ADAPTER = "faults_base_sd15.safetensors"


@pytest.fixture(scope="module")
def env(comfy):
    maps = comfy.load_pack()
    import nodes

    os.makedirs(os.path.join(comfy.models_dir, "ipadapter"), exist_ok=True)
    tiny_adapters.write_tiny_adapter(os.path.join(comfy.models_dir, "ipadapter", ADAPTER), "base", "sd15", "vit-h", seed=3)
    tiny_adapters.write_tiny_adapter(os.path.join(comfy.models_dir, "ipadapter", "faults_faceid_sd15.bin"), "faceid",
                                     "sd15", "vit-h", seed=4)
    with torch.inference_mode():
        model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(os.path.basename(comfy.files["sd15"]))[:3]
    return types.SimpleNamespace(maps=maps, nodes=nodes, model=model, clip=clip, vae=vae)


def ipadapter_prompt(comfy, start_at=0.0, weight=0.8, extra=None):
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": os.path.basename(comfy.files["sd15"])}},
        "cv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": os.path.basename(comfy.files["clip_vision_vit-h"])}},
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x808080}},
        "ipa": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": ADAPTER}},
        "apply": {"class_type": "PersonalizeIPAdapterApply", "inputs": {
            "model": ["ckpt", 0], "ipadapter": ["ipa", 0], "image": ["img", 0], "clip_vision": ["cv", 0],
            "weight": weight, "weight_type": "linear", "start_at": start_at, "end_at": 1.0, "combine_embeds": "concat",
            "embeds_scaling": "V only"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["ckpt", 1]}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "ks": {"class_type": "KSampler", "inputs": {"model": ["apply", 0], "seed": 0, "steps": 2, "cfg": 5.0,
                                                    "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0],
                                                    "negative": ["pos", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["ks", 0], "vae": ["ckpt", 2]}},
        "out": {"class_type": "PreviewImage", "inputs": {"images": ["dec", 0]}},
    }
    prompt.update(extra or {})
    return prompt


# ---------------------------------------------------------------------------------------------------------------
# Widget values through the executor


def test_start_and_end_can_come_from_links(comfy, env):
    prompt = ipadapter_prompt(comfy, start_at=["f", 0], extra={"f": {"class_type": "PrimitiveFloat", "inputs": {"value": 0.2}}})
    result = comfy.host.run_prompt(prompt)
    assert len(comfy.host.output_image_paths(result)) == 1


@pytest.mark.parametrize("field, expected", [("start_at", "start_at is nan"), ("weight", "weight is nan")])
def test_nan_widget_values_get_a_clear_error(comfy, env, field, expected):
    """NaN passes ComfyUI's own min/max check (every comparison is false); it must not reach the sampler."""
    prompt = ipadapter_prompt(comfy, **{field: math.nan})
    with pytest.raises(comfy.host.PromptExecutionError) as e:
        comfy.host.run_prompt(prompt)
    assert expected in str(e.value) and "IndexError" not in str(e.value)


def test_range_checks_of_comfyui_stay_on(comfy, env):
    with pytest.raises(comfy.host.PromptValidationError) as e:
        comfy.host.run_prompt(ipadapter_prompt(comfy, start_at=1.5))
    assert "bigger than max" in str(e.value.node_errors)


# ---------------------------------------------------------------------------------------------------------------
# NaN / odd tensors into IP-Adapter


def test_nan_inputs_are_refused_by_name(comfy, env):
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load(ADAPTER)[0]
    cv = env.nodes.CLIPVisionLoader().load_clip(os.path.basename(comfy.files["clip_vision_vit-h"]))[0]
    apply = env.maps["PersonalizeIPAdapterApply"]().apply
    args = (env.model, ipa, 0.8, "linear", 0.0, 1.0, "concat", "V only")
    image = torch.rand(1, 64, 64, 3)
    image[0, 5, 5, 1] = float("nan")  # one pixel, e.g. from an fp16 VAE decode
    with pytest.raises(ValueError, match="reference image holds 1 NaN"):
        apply(*args, image=image, clip_vision=cv)
    with pytest.raises(ValueError, match="channel-first"):
        apply(*args, image=torch.rand(1, 3, 64, 64), clip_vision=cv)
    mask = torch.ones(1, 8, 8)
    mask[0, 0, 0] = float("inf")
    emb = comfy.module("models.ipadapter").IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    with pytest.raises(ValueError, match="attn_mask holds 1 NaN or Inf"):
        apply(*args, embeds=emb, attn_mask=mask)
    bad = comfy.module("models.ipadapter").IPAEmbeds(torch.full((1, 24), float("nan")), torch.zeros(1, 24), "image_embeds")
    with pytest.raises(ValueError, match="embeds holds 24 NaN"):
        apply(*args, embeds=bad)


# ---------------------------------------------------------------------------------------------------------------
# Saved embeds: counters, listings


def test_save_embeds_advances_its_counter(comfy, env):
    emb = comfy.module("models.ipadapter").IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    names = [env.maps["PersonalizeIPAdapterSaveEmbeds"]().save(emb, "faults/counter")["ui"]["embeds"][0]["filename"]
             for _ in range(3)]
    assert len(set(names)) == 3
    import folder_paths
    folder = os.path.join(folder_paths.get_output_directory(), "faults")
    assert sorted(f for f in os.listdir(folder) if f.startswith("counter")) == sorted(names)


def test_embeds_listing_never_follows_links(comfy, env, tmp_path):
    import folder_paths

    folders = comfy.module("nodes.comfy.folders")
    root = os.path.join(folder_paths.get_input_directory(), "faults_listing")
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    emb = comfy.module("models.ipadapter").IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    emb.save(os.path.join(root, "sub", "a.ipaembeds.safetensors"))
    emb.save(str(tmp_path / "outside.ipaembeds.safetensors"))
    os.symlink(root, os.path.join(root, "sub", "loop"))  # a link loop
    os.symlink(str(tmp_path), os.path.join(root, "out"))  # a link out of the folder
    os.symlink(str(tmp_path / "outside.ipaembeds.safetensors"), os.path.join(root, "outside_link.ipaembeds.safetensors"))
    t = time.perf_counter()
    listed = folders.list_files(root, ".ipaembeds.safetensors")
    assert time.perf_counter() - t < 5
    assert listed == ["sub/a.ipaembeds.safetensors"]
    calls = []
    real_walk = os.walk
    os.walk = lambda *a, **k: calls.append(1) or real_walk(*a, **k)
    try:
        assert folders.list_files(root, ".ipaembeds.safetensors") == listed and not calls  # cached
        time.sleep(0.01)
        emb.save(os.path.join(root, "sub", "b.ipaembeds.safetensors"))
        assert "sub/b.ipaembeds.safetensors" in folders.list_files(root, ".ipaembeds.safetensors") and calls
    finally:
        os.walk = real_walk
    with pytest.raises(ValueError, match="outside its folder"):
        env.maps["PersonalizeIPAdapterLoadEmbeds"]().load("../../etc/passwd")


def test_partial_files_are_not_listed_by_loaders(comfy, env):
    import folder_paths

    folder = folder_paths.get_folder_paths("loras")[0]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".tmp-killed.partial"), "wb") as f:
        f.write(b"half a file")
    folder_paths.filename_list_cache.pop("loras", None)
    assert not [n for n in folder_paths.get_filename_list("loras") if "partial" in n or n.startswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------
# FaceID companions


def faces(pack):
    raw = torch.randn(1, 512, generator=torch.Generator().manual_seed(0)) * 20
    return types.SimpleNamespace(embedding=raw, normed=torch.nn.functional.normalize(raw, dim=-1),
                                 crops=torch.rand(1, 224, 224, 3), pack=pack)


def test_faceid_checks_its_companions(comfy, env):
    import folder_paths
    from comfy.utils import save_torch_file

    ipa = env.maps["PersonalizeIPAdapterLoader"]().load("faults_faceid_sd15.bin")[0]
    node = env.maps["PersonalizeIPAdapterFaceIDApply"]()
    args = dict(weight=0.8, weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat",
                embeds_scaling="V only")
    folder = folder_paths.get_folder_paths("loras")[0]
    save_torch_file({"some.other.weight": torch.zeros(4, 4)}, os.path.join(folder, "faults_not_a_lora.safetensors"))
    folder_paths.filename_list_cache.pop("loras", None)
    with pytest.raises(ValueError, match="changes no weight of this model"):
        node.apply(env.model, ipa, faces("buffalo_l"), lora_name="faults_not_a_lora.safetensors", **args)
    _, info = node.apply(env.model, ipa, faces("antelopev2"), **args)
    assert "warning: the faces come from antelopev2" in info and "buffalo_l" in info
    _, info = node.apply(env.model, ipa, faces("buffalo_l"), **args)
    assert "warning" not in info


def test_face_embed_names_a_nan_image(comfy, env):
    image = torch.zeros(1, 64, 64, 3)
    image[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="image holds 1 NaN"):
        env.maps["PersonalizeFaceEmbed"]().embed(None, image, "largest", 0, 112)


# ---------------------------------------------------------------------------------------------------------------
# The trainer


def train(env, name, **kw):
    args = dict(subject_token="sks", class_word="dog", palp_prompts="", steps=1, learning_rate=1e-3, rank=2,
                sude_weight=0.0, palp_weight=0.0, prior_weight=0.0, seed=0, save_name=name, resume=False,
                images=torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0)), validation_steps=0)
    args.update(kw)
    model = args.pop("model", env.model)
    with torch.inference_mode():
        return env.maps["PersonalizeLoRATrainer"]().train(model, env.clip, env.vae, **args)


def test_trainer_refuses_to_replace_a_users_file(comfy, env):
    import folder_paths
    import safetensors.torch as st

    path = os.path.join(folder_paths.get_folder_paths("loras")[0], "faults_users.safetensors")
    st.save_file({"x": torch.ones(2)}, path)
    with pytest.raises(FileExistsError, match="not written by ComfyUI-Personalize"):
        train(env, "faults_users")
    assert torch.equal(st.load_file(path)["x"], torch.ones(2))
    assert not os.path.exists(os.path.join(folder_paths.get_output_directory(), "personalize_train",
                                           "faults_users.state.safetensors"))  # refused before any work
    train(env, "faults_users", overwrite=True)
    assert "x" not in st.load_file(path)


@pytest.mark.parametrize("kw, expected", [
    ({"images": torch.full((1, 64, 64, 3), float("nan"))}, "subject images holds"),
    ({"images": torch.rand(1, 1, 1, 3)}, "1x1 px"),
    ({"images": torch.rand(0, 64, 64, 3)}, "empty batch"),
    ({"learning_rate": float("nan")}, "learning_rate is nan"),
    ({"save_name": "n" * 300}, "bytes long"),
    ({"image_folder": "../../", "images": None}, "inside ComfyUI's input folder"),
])
def test_trainer_refuses_bad_input_before_any_work(comfy, env, kw, expected):
    import folder_paths

    before = set(os.listdir(folder_paths.get_folder_paths("loras")[0]))
    with pytest.raises(ValueError, match=expected):
        train(env, "faults_bad", **kw)
    assert set(os.listdir(folder_paths.get_folder_paths("loras")[0])) == before


def test_trainer_reads_folders_inside_the_input_folder(comfy, env):
    import folder_paths

    folder = os.path.join(folder_paths.get_input_directory(), "faults_subject")
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(os.path.join(folder, "a.png"))
    out = train(env, "faults_folder", images=None, image_folder="faults_subject",
                validation_prompt="{subject}: a photo of {token} {class_word}", validation_steps=2)
    assert out[1] == "faults_folder.safetensors" and out[3].shape[0] == 1  # braces in the prompt are kept


def test_trainer_refuses_a_patched_model(comfy, env):
    ipa = env.maps["PersonalizeIPAdapterLoader"]().load(ADAPTER)[0]
    emb = comfy.module("models.ipadapter").IPAEmbeds(torch.randn(1, 24), torch.zeros(1, 24), "image_embeds")
    patched = env.maps["PersonalizeIPAdapterApply"]().apply(env.model, ipa, 0.8, "linear", 0.0, 1.0, "concat", "V only",
                                                            embeds=emb)[0]
    with pytest.raises(ValueError, match="attention patches of other nodes"):
        train(env, "faults_patched", model=patched)


# ---------------------------------------------------------------------------------------------------------------
# Frontend rounding of FLOAT widgets


def frontend_value(typed: float, opts: dict) -> float:
    """What ComfyUI's frontend (1.27.10, the version 0.3.64 pins: useFloatWidget / onFloatValueChange) stores for a
    typed FLOAT, with its default settings: precision p = max(0, -floor(log10(step))), rounding to 10^-p unless the
    input sets a truthy ``round``, then ``toFixed(p)`` and clamping."""
    step = opts.get("step", 0.5)
    precision = max(0, -math.floor(math.log10(step)))
    rnd = opts.get("round") or (10 ** -precision if precision else None)
    value = typed
    if rnd:
        value = round(round(typed / rnd) * rnd, precision)
    return min(max(value, opts.get("min", 0)), opts.get("max", 2048))


def test_small_floats_can_be_typed(comfy, env):
    """Every FLOAT widget keeps its default through the frontend's rounding, and the learning rates keep the values
    papers use (SuDe's reference trains at 1e-6)."""
    for node_id, cls in env.maps.items():
        for group in cls.INPUT_TYPES().values():
            for name, spec in group.items():
                if spec[0] != "FLOAT":
                    continue
                opts = spec[1]
                assert frontend_value(opts["default"], opts) == pytest.approx(opts["default"], rel=1e-9), (node_id, name)
    trainer = env.maps["PersonalizeLoRATrainer"].INPUT_TYPES()
    for name in ("learning_rate", "token_learning_rate"):
        opts = {**trainer["required"], **trainer["optional"]}[name][1]
        for typed in (1e-6, 2e-6, 1.5e-5, 3e-4):
            assert frontend_value(typed, opts) == pytest.approx(typed, rel=1e-9), (name, typed)
