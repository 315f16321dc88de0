"""Tier 2: devtools/convert_ipadapter_plus.py on small UI-format workflows built like ComfyUI_IPAdapter_plus' examples
(its node types, widget orders and output slots, read from that pack for the facts); the converted workflows must
validate against our node definitions in a real ComfyUI and keep their settings."""
import convert_ipadapter_plus as conv
import pytest
import tiny_adapters


class Graph:
    """A UI-format workflow built node by node: ``add(type, widgets, inputs={name: (node, slot)}, outputs=[...])``."""

    def __init__(self):
        self.nodes, self.links = [], []

    def add(self, kind, widgets=(), inputs=None, outputs=(), optional=()):
        nid = len(self.nodes) + 1
        node = {"id": nid, "type": kind, "pos": [100 * nid, 0], "size": [300, 100], "flags": {}, "order": nid, "mode": 0,
                "inputs": [], "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
                "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets)}
        for name, (src, slot, typ) in (inputs or {}).items():
            lid = len(self.links) + 1
            self.links.append([lid, src, slot, nid, len(node["inputs"]), typ])
            node["inputs"].append({"name": name, "type": typ, "link": lid})
            self.nodes[src - 1]["outputs"][slot]["links"].append(lid)
        for name, typ in optional:
            node["inputs"].append({"name": name, "type": typ, "link": None})
        self.nodes.append(node)
        return nid

    def ui(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes, "links": self.links,
                "groups": [], "config": {}, "extra": {}, "version": 0.4}


def base(g, ckpt):
    ck = g.add("CheckpointLoaderSimple", [ckpt], outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")])
    img = g.add("LoadImage", ["ref.png", "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")])
    return ck, img


def finish(g, ck, model_src, positive=None):
    pos = positive or (g.add("CLIPTextEncode", ["a photo"], {"clip": (ck, 1, "CLIP")}, [("CONDITIONING", "CONDITIONING")]), 0)
    neg = g.add("CLIPTextEncode", ["blurry"], {"clip": (ck, 1, "CLIP")}, [("CONDITIONING", "CONDITIONING")])
    lat = g.add("EmptyLatentImage", [64, 64, 1], outputs=[("LATENT", "LATENT")])
    ks = g.add("KSampler", [1, "fixed", 2, 5.0, "euler", "normal", 1.0],
               {"model": model_src, "positive": (pos[0], pos[1], "CONDITIONING"), "negative": (neg, 0, "CONDITIONING"),
                "latent_image": (lat, 0, "LATENT")}, [("LATENT", "LATENT")])
    dec = g.add("VAEDecode", [], {"samples": (ks, 0, "LATENT"), "vae": (ck, 2, "VAE")}, [("IMAGE", "IMAGE")])
    g.add("PreviewImage", [], {"images": (dec, 0, "IMAGE")})


def check(comfy, ui):
    comfy.host.check_ui_workflow(ui)
    api = comfy.host.ui_to_api(ui)
    comfy.host.validate(api)
    return api


@pytest.fixture(scope="module")
def host(comfy):
    import os

    import folder_paths
    import numpy as np
    from PIL import Image

    comfy.load_pack()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(os.path.join(folder_paths.get_input_directory(), "ref.png"))
    os.makedirs(os.path.join(comfy.models_dir, "ipadapter"), exist_ok=True)
    for layout in ("sd15", "sdxl"):  # the adapter files the graphs name
        path = os.path.join(comfy.models_dir, "ipadapter", f"tiny_base_{layout}.safetensors")
        if not os.path.exists(path):
            tiny_adapters.write_tiny_adapter(path, "base", layout, "vit-h", seed=7)
    folder_paths.filename_list_cache.pop("ipadapter", None)
    return comfy


def test_the_unified_loader_and_simple_apply(host):
    g = Graph()
    ck, img = base(g, "tiny_sd15.safetensors")
    loader = g.add("IPAdapterUnifiedLoader", ["PLUS (high strength)"], {"model": (ck, 0, "MODEL")},
                   [("model", "MODEL"), ("ipadapter", "IPADAPTER")], optional=[("ipadapter", "IPADAPTER")])
    apply = g.add("IPAdapter", [0.8, 0.1, 0.9, "prompt is more important"],
                  {"model": (loader, 0, "MODEL"), "ipadapter": (loader, 1, "IPADAPTER"), "image": (img, 0, "IMAGE")},
                  [("MODEL", "MODEL")], optional=[("attn_mask", "MASK")])
    finish(g, ck, (apply, 0, "MODEL"))
    out, report = conv.convert(g.ui())
    api = check(host, out)
    assert api[str(loader)] == {"class_type": "PersonalizeIPAdapterUnifiedLoader",
                                "inputs": {"model": [str(ck), 0], "preset": "plus", "lora_strength": 0.6, "provider": "CPU"}}
    a = api[str(apply)]["inputs"]
    assert api[str(apply)]["class_type"] == "PersonalizeIPAdapterApply" and a["clip_vision"] == [str(loader), 2]
    assert (a["weight"], a["start_at"], a["end_at"], a["weight_type"]) == (0.8, 0.1, 0.9, "ease out")
    assert any("clip_vision linked from the unified loader" in r for r in report)


def test_advanced_precise_and_unsupported_settings_are_reported(host):
    g = Graph()
    ck, img = base(g, "tiny_sdxl.safetensors")
    ml = g.add("IPAdapterModelLoader", ["tiny_base_sdxl.safetensors"], outputs=[("IPADAPTER", "IPADAPTER")])
    cv = g.add("CLIPVisionLoader", ["tiny_clip_vision_vit-h.safetensors"], outputs=[("CLIP_VISION", "CLIP_VISION")])
    refs = {"ipadapter": (ml, 0, "IPADAPTER"), "image": (img, 0, "IMAGE"), "clip_vision": (cv, 0, "CLIP_VISION")}
    adv = g.add("IPAdapterAdvanced", [0.6, "style transfer precise", "add", 0.0, 1.0, "K+mean(V) w/ C penalty"],
                {"model": (ck, 0, "MODEL"), **refs}, [("MODEL", "MODEL")])
    pst = g.add("IPAdapterPreciseStyleTransfer", [1.0, 2.5, "concat", 0.0, 1.0, "V only"],
                {"model": (adv, 0, "MODEL"), **refs}, [("MODEL", "MODEL")])
    ms = g.add("IPAdapterMS", [1.0, 1.0, "linear", "concat", 0.0, 1.0, "V only", "3:1.0, 6:0.5"],
               {"model": (pst, 0, "MODEL"), **refs}, [("MODEL", "MODEL")], optional=[("insightface", "INSIGHTFACE")])
    fid = g.add("IPAdapterFaceID", [1.0, 1.0, "linear", "concat", 0.0, 1.0, "V only"],
                {"model": (ms, 0, "MODEL"), **refs}, [("MODEL", "MODEL"), ("face_image", "IMAGE")])
    finish(g, ck, (ms, 0, "MODEL"))
    out, report = conv.convert(g.ui())
    text = "\n".join(report)
    assert "combine_embeds 'add' has no counterpart" in text and "'K+mean(V) w/ C penalty' is not available" in text
    assert f"node {fid} (IPAdapterFaceID): not converted" in text
    out["nodes"] = [n for n in out["nodes"] if n["id"] != fid]  # the user replaces the FaceID node by hand
    out["links"] = [link for link in out["links"] if fid not in (link[1], link[3])]
    api = check(host, out)
    a, p, m = api[str(adv)]["inputs"], api[str(pst)]["inputs"], api[str(ms)]["inputs"]
    assert (a["weight_type"], a["composition_weight"], a["combine_embeds"], a["embeds_scaling"]) == \
        ("style transfer precise", 0.6, "concat", "V only")  # Advanced's precise types boost by the weight
    assert (p["weight_type"], p["composition_weight"]) == ("style transfer precise", 2.5)
    assert api[str(ms)]["class_type"] == "PersonalizeIPAdapterApplyLayerWeights"
    assert (m["layer_weights"], m["layer_indexing"]) == ("3:1.0, 6:0.5", "transformer")


def test_regional_conditioning_and_the_tools(host):
    g = Graph()
    ck, img = base(g, "tiny_sd15.safetensors")
    ml = g.add("IPAdapterModelLoader", ["tiny_base_sd15.safetensors"], outputs=[("IPADAPTER", "IPADAPTER")])
    cv = g.add("CLIPVisionLoader", ["tiny_clip_vision_vit-h.safetensors"], outputs=[("CLIP_VISION", "CLIP_VISION")])
    mask = g.add("SolidMask", [1.0, 64, 64], outputs=[("MASK", "MASK")])
    txt = g.add("CLIPTextEncode", ["a car"], {"clip": (ck, 1, "CLIP")}, [("CONDITIONING", "CONDITIONING")])
    prep = g.add("PrepImageForClipVision", ["LANCZOS", "top", 0.1], {"image": (img, 0, "IMAGE")}, [("IMAGE", "IMAGE")])
    noise = g.add("IPAdapterNoise", ["fade", 0.5, 3], outputs=[("IMAGE", "IMAGE")], optional=[("image_optional", "IMAGE")])
    regions = [g.add("IPAdapterRegionalConditioning", [0.7, 1.5, "linear", 0.0, 1.0],
                     {"image": (prep, 0, "IMAGE"), "mask": (mask, 0, "MASK"), "positive": (txt, 0, "CONDITIONING")},
                     [("IPADAPTER_PARAMS", "IPADAPTER_PARAMS"), ("POSITIVE", "CONDITIONING"), ("NEGATIVE", "CONDITIONING")],
                     optional=[("negative", "CONDITIONING")]) for _ in range(2)]
    comb = g.add("IPAdapterCombineParams", [], {"params_1": (regions[0], 0, "IPADAPTER_PARAMS"),
                                                "params_2": (regions[1], 0, "IPADAPTER_PARAMS")},
                 [("IPADAPTER_PARAMS", "IPADAPTER_PARAMS")], optional=[("params_3", "IPADAPTER_PARAMS")])
    fp = g.add("IPAdapterFromParams", ["concat", "V only"],
               {"model": (ck, 0, "MODEL"), "ipadapter": (ml, 0, "IPADAPTER"), "ipadapter_params": (comb, 0, "IPADAPTER_PARAMS"),
                "clip_vision": (cv, 0, "CLIP_VISION"), "image_negative": (noise, 0, "IMAGE")}, [("MODEL", "MODEL")])
    finish(g, ck, (fp, 0, "MODEL"), positive=(regions[0], 1))
    out, report = conv.convert(g.ui())
    api = check(host, out)
    assert api[str(regions[0])]["class_type"] == "PersonalizeIPAdapterRegion"
    assert api[str(regions[0])]["inputs"]["prompt_weight"] == 1.5
    assert api[str(comb)]["inputs"] == {"regions_1": [str(regions[0]), 0], "regions_2": [str(regions[1]), 0]}
    assert api[str(fp)]["inputs"]["regions"] == [str(comb), 0] and "image_negative" not in api[str(fp)]["inputs"]
    assert api[str(prep)]["inputs"]["crop_position"] == "top" and api[str(noise)]["inputs"]["seed"] == 0
    assert any("image_negative dropped" in r for r in report)


def test_a_faceid_apply_gets_a_face_embed_node(host):
    g = Graph()
    ck, img = base(g, "tiny_sd15.safetensors")
    loader = g.add("IPAdapterUnifiedLoaderFaceID", ["FACEID PLUS V2", 0.7, "CPU"], {"model": (ck, 0, "MODEL")},
                   [("MODEL", "MODEL"), ("ipadapter", "IPADAPTER")], optional=[("ipadapter", "IPADAPTER")])
    fid = g.add("IPAdapterFaceID", [0.9, 1.5, "linear", "concat", 0.0, 1.0, "V only"],
                {"model": (loader, 0, "MODEL"), "ipadapter": (loader, 1, "IPADAPTER"), "image": (img, 0, "IMAGE")},
                [("MODEL", "MODEL"), ("face_image", "IMAGE")], optional=[("insightface", "INSIGHTFACE")])
    finish(g, ck, (fid, 0, "MODEL"))
    out, report = conv.convert(g.ui())
    api = check(host, out)
    embed = next(k for k, v in api.items() if v["class_type"] == "PersonalizeFaceEmbed")
    assert api[embed]["inputs"] == {"face_analysis": [str(loader), 3], "image": [str(img), 0], "selection": "highest score",
                                    "face_index": 0, "crop_size": 224}
    f = api[str(fid)]
    assert f["class_type"] == "PersonalizeIPAdapterFaceIDApply" and f["inputs"]["face_embeds"] == [embed, 0]
    assert f["inputs"]["clip_vision"] == [str(loader), 2] and f["inputs"]["shortcut_weight"] == 1.5
    assert api[str(loader)]["inputs"]["preset"] == "FaceID Plus v2" and api[str(loader)]["inputs"]["lora_strength"] == 0.7
    assert any("Face Embed node" in r for r in report)
