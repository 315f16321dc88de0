# SPDX-License-Identifier: GPL-3.0-or-later
"""Tier-2 tests of the headless ComfyUI host and the tiny models (devtools/)."""

import os
import sys
import textwrap

import numpy as np
import pytest
import torch


def txt2img_prompt(ckpt, seed=1, steps=2, size=64, output="SaveImage"):
    """The classic ComfyUI default graph, API format."""
    out = {"class_type": output, "inputs": {"images": ["8", 0]}}
    if output == "SaveImage":
        out["inputs"]["filename_prefix"] = "host_test"
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": seed, "steps": steps, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0],
            "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": out,
    }


def load_image(path):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def ckpt_name(comfy, key):
    return os.path.basename(comfy.files[key])


# ---------------------------------------------------------------------------
# bootstrap / folders
# ---------------------------------------------------------------------------

def test_bootstrap_imports_comfyui_nodes_not_the_pack(comfy):
    import nodes
    root = os.path.realpath(os.environ["COMFYUI_PATH"])
    assert os.path.realpath(nodes.__file__) == os.path.join(root, "nodes.py")
    assert "KSampler" in nodes.NODE_CLASS_MAPPINGS
    assert "LatentUpscaleBy" in nodes.NODE_CLASS_MAPPINGS  # a comfy_extras node
    # `python -m pytest` puts the cwd (the repo root) on sys.path as ''; ComfyUI must come first
    resolved = [os.path.realpath(p or ".") for p in sys.path]
    if os.path.realpath(comfy.repo_root) in resolved:
        assert resolved.index(root) < resolved.index(os.path.realpath(comfy.repo_root))
    # idempotent
    assert comfy.host.bootstrap(root) is nodes


def test_use_models_dir_prepends_and_keeps_entries(comfy):
    import folder_paths
    comfy.host.use_models_dir(comfy.models_dir)  # other tests (the workflow runner) may have put a dir in front
    ckpt_paths = folder_paths.get_folder_paths("checkpoints")
    assert ckpt_paths[0] == os.path.join(comfy.models_dir, "checkpoints")
    assert len(ckpt_paths) >= 2  # ComfyUI's own models/checkpoints is still there
    assert "tiny_sd15.safetensors" in folder_paths.get_filename_list("checkpoints")
    assert folder_paths.get_folder_paths("ipadapter")[0] == os.path.join(comfy.models_dir, "ipadapter")
    comfy.host.use_models_dir(comfy.models_dir, folder_names=("photomaker",))
    assert folder_paths.get_folder_paths("checkpoints") == ckpt_paths  # idempotent, no duplicates
    assert folder_paths.get_folder_paths("photomaker")[0] == os.path.join(comfy.models_dir, "photomaker")


# ---------------------------------------------------------------------------
# tiny checkpoints
# ---------------------------------------------------------------------------

def _attn2_sites_of(diffusion_model):
    """[(block, transformer_index, width, context_dim)] from the actual modules."""
    found = []
    for name, mod in diffusion_model.named_modules():
        if not name.endswith(".attn2"):
            continue
        parts = name.split(".")
        if parts[0] == "middle_block":
            block = ("middle", 0)
        else:
            block = ({"input_blocks": "input", "output_blocks": "output"}[parts[0]], int(parts[1]))
        t = int(parts[parts.index("transformer_blocks") + 1])
        found.append((block, t, mod.to_q.in_features, mod.to_k.in_features))
    return found


@pytest.mark.parametrize("kind,n_sites,class_name", [("sd15", 16, "PersonalizeTinySD15"),
                                                     ("sdxl", 70, "PersonalizeTinySDXL")])
def test_tiny_checkpoint_loads_with_checkpointloadersimple(comfy, kind, n_sites, class_name):
    import nodes
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name(comfy, kind))
    assert type(model.model.model_config).__name__ == class_name
    info = comfy.tiny.TINY_UNETS[kind]
    sites = _attn2_sites_of(model.model.diffusion_model)
    assert len(sites) == n_sites
    expected = [(s["block"], s["transformer_index"], s["width"], info["context_dim"]) for s in info["attn2_sites"]]
    assert sorted(sites) == sorted(expected)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a photo of a cat"), return_pooled=True)
    assert cond.shape == (1, 77, info["context_dim"])
    if kind == "sdxl":
        assert pooled.shape == (1, info["pooled_dim"])
        assert model.model.diffusion_model.label_emb[0][0].in_features == info["adm_in_channels"]
    assert torch.isfinite(cond).all() and 0.1 < cond.std().item() < 10


def test_tiny_writer_is_deterministic(comfy, tmp_path):
    from safetensors.torch import load_file
    a = load_file(comfy.tiny.write_tiny_clip_vision(str(tmp_path / "a.safetensors"), "vit-h", seed=0))
    b = load_file(comfy.tiny.write_tiny_clip_vision(str(tmp_path / "b.safetensors"), "vit-h", seed=0))
    c = load_file(comfy.tiny.write_tiny_clip_vision(str(tmp_path / "c.safetensors"), "vit-h", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual_projection.weight"], c["visual_projection.weight"])


# ---------------------------------------------------------------------------
# running prompts
# ---------------------------------------------------------------------------

def test_txt2img_sd15_runs_and_is_deterministic(comfy):
    name = ckpt_name(comfy, "sd15")
    first = comfy.host.output_image_paths(comfy.host.run_prompt(txt2img_prompt(name, seed=1)))
    assert len(first) == 1
    img1 = load_image(first[0])
    assert img1.shape == (64, 64, 3)
    assert img1.std() > 1.0  # not a flat / saturated image
    img2 = load_image(comfy.host.output_image_paths(comfy.host.run_prompt(txt2img_prompt(name, seed=1)))[0])
    img3 = load_image(comfy.host.output_image_paths(comfy.host.run_prompt(txt2img_prompt(name, seed=2)))[0])
    assert np.array_equal(img1, img2)
    assert not np.array_equal(img1, img3)


def test_txt2img_sdxl_runs_with_previewimage(comfy):
    result = comfy.host.run_prompt(txt2img_prompt(ckpt_name(comfy, "sdxl"), size=64, output="PreviewImage"))
    paths = comfy.host.output_image_paths(result)
    assert len(paths) == 1 and os.path.isfile(paths[0])
    assert load_image(paths[0]).shape == (64, 64, 3)
    assert result["outputs"]["9"]["images"][0]["type"] == "temp"


def test_run_prompt_reports_validation_errors(comfy):
    prompt = txt2img_prompt("no_such_model.safetensors")
    with pytest.raises(comfy.host.PromptValidationError) as err:
        comfy.host.run_prompt(prompt)
    assert "4" in err.value.node_errors
    assert "no_such_model.safetensors" in str(err.value)


# ---------------------------------------------------------------------------
# CLIP vision
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["vit-h", "vit-bigG"])
def test_tiny_clip_vision_loader_and_encode(comfy, kind):
    import nodes
    dims = comfy.tiny.TINY_CLIP_VISION[kind]
    (clip_vision,) = nodes.CLIPVisionLoader().load_clip(os.path.basename(comfy.files["clip_vision_" + kind]))
    image = torch.rand(2, 96, 80, 3, generator=torch.Generator().manual_seed(0))
    (out,) = nodes.CLIPVisionEncode().encode(clip_vision, image, "center")
    assert out.image_embeds.shape == (2, dims["projection_dim"])
    assert out.penultimate_hidden_states.shape == (2, dims["num_tokens"], dims["hidden_size"])
    assert out.last_hidden_state.shape == (2, dims["num_tokens"], dims["hidden_size"])
    assert not torch.allclose(out.image_embeds[0], out.image_embeds[1])


@pytest.mark.parametrize("kind", ["vit-h", "vit-bigG"])
def test_tiny_clip_vision_is_transformers_layout(comfy, kind):
    """The file loads strictly into transformers' CLIPVisionModelWithProjection and gives the same outputs."""
    import comfy.clip_vision as cv
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sd = load_file(comfy.files["clip_vision_" + kind])
    cfg = comfy.tiny.clip_vision_config(kind)
    hf = CLIPVisionModelWithProjection(CLIPVisionConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert [k for k in missing if not k.endswith("position_ids")] == [] and unexpected == []
    ours = cv.load(comfy.files["clip_vision_" + kind])
    pixels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf.eval()(pixel_values=pixels, output_hidden_states=True)
        got = ours.model(pixel_values=pixels, intermediate_output=-2)
    torch.testing.assert_close(got[2], ref.image_embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], ref.hidden_states[-2], atol=1e-4, rtol=1e-4)


def test_clip_vision_wrapper_passes_other_state_dicts_through(comfy):
    import comfy.clip_vision as cv
    assert getattr(cv.load_clipvision_from_sd, "_personalize_tiny", False)
    assert cv.load_clipvision_from_sd({"foo": torch.zeros(1)}) is None  # unknown -> original behaviour
    assert comfy.tiny.tiny_clip_vision_kind({"vision_model.encoder.layers.0.layer_norm1.weight": torch.zeros(1280),
                                             "visual_projection.weight": torch.zeros(1024, 1280)}) is None


# ---------------------------------------------------------------------------
# diffusers parity
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_conversion_parity(comfy, kind):
    import nodes
    model, _, _ = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name(comfy, kind))
    unet = comfy.tiny.to_diffusers_unet(model)
    info = comfy.tiny.TINY_UNETS[kind]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 10.0])
    ctx = torch.randn(2, 77, info["context_dim"], generator=g)
    kwargs, dkwargs = {}, {}
    if kind == "sdxl":
        pooled = torch.randn(2, info["pooled_dim"], generator=g)
        time_ids = comfy.tiny.sdxl_time_ids(64, 48, 4, 2, 64, 48)
        kwargs["y"] = comfy.tiny.comfy_sdxl_y(pooled, time_ids)
        dkwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                        "time_ids": torch.tensor([time_ids] * 2, dtype=torch.float32)}
    with torch.no_grad():
        ref = model.model.diffusion_model(x, t, context=ctx, **kwargs)
        got = unet(x, t, encoder_hidden_states=ctx, **dkwargs).sample
    assert ref.abs().max() > 0.1  # a real signal, not zeros
    assert (got - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------------------
# custom-node loading (throwaway pack)
# ---------------------------------------------------------------------------

def _write_pack(root, body_init, files=None):
    root.mkdir(parents=True)
    (root / "__init__.py").write_text(textwrap.dedent(body_init))
    for rel, text in (files or {}).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


THROWAWAY_NODES = '''
import nodes as comfy_nodes  # ComfyUI's nodes.py, not this package's nodes/

assert hasattr(comfy_nodes, "KSampler"), "pack's nodes/ shadowed ComfyUI's nodes.py"


class HostTestScale:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",), "factor": ("FLOAT", {"default": 0.5}),
                             "fail": ("BOOLEAN", {"default": False})}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, image, factor, fail):
        if fail:
            raise ValueError("host test node asked to fail")
        return (image * factor,)
'''


def test_load_pack_through_comfy_loader_and_run(comfy, tmp_path):
    pack = _write_pack(tmp_path / "pack", '''
        from .nodes.scale import HostTestScale
        NODE_CLASS_MAPPINGS = {"PersonalizeHostTestScale": HostTestScale}
        ''', {"nodes/__init__.py": "", "nodes/scale.py": THROWAWAY_NODES})
    mappings = comfy.host.load_pack(str(pack), dir_name="HostTestPack")
    assert set(mappings) == {"PersonalizeHostTestScale"}
    assert comfy.host.load_pack(str(pack), dir_name="HostTestPack") is mappings  # cached
    import nodes
    assert nodes.NODE_CLASS_MAPPINGS["PersonalizeHostTestScale"] is mappings["PersonalizeHostTestScale"]
    assert sys.modules["nodes"] is nodes

    def prompt(fail):
        return {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 1,
                                                           "color": 0xFFFFFF}},
            "2": {"class_type": "PersonalizeHostTestScale", "inputs": {"image": ["1", 0], "factor": 0.5,
                                                                       "fail": fail}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "pack_test"}},
        }

    img = load_image(comfy.host.output_image_paths(comfy.host.run_prompt(prompt(False)))[0])
    assert img.shape == (8, 16, 3)
    assert abs(int(img[0, 0, 0]) - 127) <= 1  # white * 0.5
    with pytest.raises(comfy.host.PromptExecutionError) as err:
        comfy.host.run_prompt(prompt(True))
    assert "host test node asked to fail" in str(err.value)
    assert err.value.details["node_id"] == "2"


def test_load_pack_failure_reports_reason(comfy, tmp_path):
    pack = _write_pack(tmp_path / "broken", '''
        raise ImportError("personalize broken pack marker")
        ''')
    with pytest.raises(comfy.host.PackLoadError) as err:
        comfy.host.load_pack(str(pack), dir_name="HostTestBrokenPack")
    assert "personalize broken pack marker" in str(err.value)


# ---------------------------------------------------------------------------
# UI -> API conversion
# ---------------------------------------------------------------------------

def _ui_txt2img(ckpt):
    """A UI-format default graph with a Reroute, a PrimitiveNode on a converted widget,
    a bypassed node, a muted node and a Note."""
    def node(nid, ntype, inputs=(), outputs=(), widgets=None, mode=0, **extra):
        d = {"id": nid, "type": ntype, "mode": mode, "inputs": list(inputs), "outputs": list(outputs)}
        if widgets is not None:
            d["widgets_values"] = widgets
        d.update(extra)
        return d

    links = [
        [1, 4, 0, 10, 0, "MODEL"],     # ckpt MODEL -> reroute
        [2, 10, 0, 3, 0, "MODEL"],     # reroute -> KSampler.model
        [3, 4, 1, 6, 0, "CLIP"],
        [4, 4, 1, 7, 0, "CLIP"],
        [5, 6, 0, 3, 1, "CONDITIONING"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 5, 0, 11, 0, "LATENT"],    # empty latent -> bypassed upscale
        [8, 11, 0, 3, 3, "LATENT"],    # bypassed upscale -> KSampler.latent_image
        [9, 3, 0, 8, 0, "LATENT"],
        [10, 4, 2, 8, 1, "VAE"],
        [11, 8, 0, 9, 0, "IMAGE"],
        [12, 12, 0, 5, 0, "INT"],      # primitive -> EmptyLatentImage.width (converted widget)
        [13, 8, 0, 13, 0, "IMAGE"],    # -> muted SaveImage
    ]
    nodes_ = [
        node(4, "CheckpointLoaderSimple", outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]}],
             widgets=[ckpt]),
        node(10, "Reroute", inputs=[{"name": "", "type": "*", "link": 1}],
             outputs=[{"name": "", "type": "MODEL", "links": [2]}]),
        node(12, "PrimitiveNode", outputs=[{"name": "INT", "type": "INT", "links": [12],
                                            "widget": {"name": "width"}}], widgets=[64, "fixed"]),
        node(5, "EmptyLatentImage", inputs=[{"name": "width", "type": "INT", "link": 12,
                                             "widget": {"name": "width"}}], widgets=[512, 64, 1]),
        node(6, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 3}], widgets=["a cat"]),
        node(7, "CLIPTextEncode", inputs=[{"name": "clip", "type": "CLIP", "link": 4}], widgets=["blurry"]),
        node(11, "LatentUpscaleBy", mode=4, inputs=[{"name": "samples", "type": "LATENT", "link": 7}],
             outputs=[{"name": "LATENT", "type": "LATENT", "links": [8]}], widgets=["nearest-exact", 1.5]),
        node(3, "KSampler", inputs=[{"name": "model", "type": "MODEL", "link": 2},
                                    {"name": "positive", "type": "CONDITIONING", "link": 5},
                                    {"name": "negative", "type": "CONDITIONING", "link": 6},
                                    {"name": "latent_image", "type": "LATENT", "link": 8}],
             widgets=[7, "randomize", 2, 7.0, "euler", "normal", 1.0]),
        node(8, "VAEDecode", inputs=[{"name": "samples", "type": "LATENT", "link": 9},
                                     {"name": "vae", "type": "VAE", "link": 10}]),
        node(9, "SaveImage", inputs=[{"name": "images", "type": "IMAGE", "link": 11}], widgets=["ui_test"],
             title="Result"),
        node(13, "SaveImage", mode=2, inputs=[{"name": "images", "type": "IMAGE", "link": 13}],
             widgets=["muted"]),
        node(14, "Note", widgets=["just a note"]),
    ]
    return {"last_node_id": 14, "last_link_id": 13, "nodes": nodes_, "links": links, "groups": [],
            "version": 0.4}


def test_ui_to_api_converts_and_runs(comfy):
    ckpt = ckpt_name(comfy, "sd15")
    ui = _ui_txt2img(ckpt)
    comfy.host.check_ui_workflow(ui)
    api = comfy.host.ui_to_api(ui)
    assert api == {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 7, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ui_test", "images": ["8", 0]},
              "_meta": {"title": "Result"}},
    }
    assert comfy.host.ui_to_api(api) is api  # API format passes through
    paths = comfy.host.output_image_paths(comfy.host.run_prompt(api))
    assert load_image(paths[0]).shape == (64, 64, 3)


def test_check_ui_workflow_finds_mismatches(comfy):
    ui = _ui_txt2img("x.safetensors")
    ksampler = next(n for n in ui["nodes"] if n["id"] == 3)
    ksampler["widgets_values"] = ksampler["widgets_values"][:-1]  # one widget value missing
    ui["nodes"].append({"id": 20, "type": "NoSuchNodeType", "mode": 0, "inputs": [], "outputs": []})
    decode = next(n for n in ui["nodes"] if n["id"] == 8)
    decode["inputs"].append({"name": "not_an_input", "type": "VAE", "link": None})
    with pytest.raises(ValueError) as err:
        comfy.host.check_ui_workflow(ui)
    msg = str(err.value)
    assert "node 3 (KSampler)" in msg and "node 20 (NoSuchNodeType): unknown node type" in msg
    assert "'not_an_input'" in msg
    with pytest.raises(ValueError):
        comfy.host.ui_to_api(ui)


def test_run_workflow_name_heuristics(comfy):
    import run_workflow as rw
    assert rw.ipadapter_spec("ip-adapter_sd15.safetensors") == ("base", "sd15", "vit-h")
    assert rw.ipadapter_spec("ip-adapter_sd15_vit-G.safetensors") == ("vit-g", "sd15", "vit-bigG")
    assert rw.ipadapter_spec("ip-adapter_sdxl.safetensors") == ("base", "sdxl", "vit-bigG")
    assert rw.ipadapter_spec("ip-adapter_sdxl_vit-h.safetensors") == ("base", "sdxl", "vit-h")
    assert rw.ipadapter_spec("ip-adapter-plus-face_sdxl_vit-h.safetensors") == ("plus", "sdxl", "vit-h")
    assert rw.ipadapter_spec("ip-adapter-full-face_sd15.safetensors") == ("full-face", "sd15", "vit-h")
    assert rw.checkpoint_layout("sd_xl_base_1.0.safetensors") == "sdxl"
    assert rw.checkpoint_layout("v1-5-pruned-emaonly-fp16.safetensors") == "sd15"
    assert rw.clip_vision_kind("CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors") == "vit-bigG"
    refs = rw.model_refs(txt2img_prompt("model.safetensors"))
    assert refs == [("4", "ckpt_name", "checkpoints", "model.safetensors")]
