# SPDX-License-Identifier: GPL-3.0-or-later
"""Convert a saved workflow (the frontend's UI format) that uses ComfyUI_IPAdapter_plus' nodes into one that uses
ComfyUI-Personalize's, where a mapping exists; print what could not be mapped.

    python devtools/convert_ipadapter_plus.py in.json out.json

Nodes are mapped one to one (their position, title and links kept; widget values moved by name; output slots
remapped). Where the popular pack's adapter carries its CLIP vision model inside (the unified loader), the converted
Apply node gets a link from our loader's clip_vision output. Nodes of that pack without a counterpart, and settings
ours do not have (a combine method or embeds scaling we lack), are left as they are and reported; a FaceID apply
(which takes an image where ours takes face embeds) gets a Face Embed node before it; nothing else in the workflow is
touched. The table below is the README's
migration table in code.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

PRESETS = {"LIGHT - SD1.5 only (low strength)": "light", "STANDARD (medium strength)": "standard",
           "VIT-G (medium strength)": "vit-G", "PLUS (high strength)": "plus", "PLUS FACE (portraits)": "plus face",
           "FULL FACE - SD1.5 only (portraits stronger)": "full face", "FACEID": "FaceID",
           "FACEID PLUS - SD1.5 only": "FaceID Plus", "FACEID PLUS V2": "FaceID Plus v2",
           "FACEID PORTRAIT (style transfer)": "Portrait", "FACEID PORTRAIT UNNORM - SDXL only (strong)": "Portrait unnorm"}
SIMPLE_WEIGHT_TYPES = {"standard": "linear", "prompt is more important": "ease out", "style transfer": "style transfer"}
OUR_COMBINE = ("concat", "average", "norm average")
OUR_SCALING = ("V only", "K+V", "K+V w/ C penalty")
APPLY_WIDGETS = ("weight", "weight_type", "start_at", "end_at", "combine_embeds", "embeds_scaling", "composition_weight")


@dataclass
class Mapping:
    ours: str
    widgets: tuple[str, ...]  # the popular node's widget inputs, in their order (= its widgets_values)
    our_widgets: tuple[str, ...]  # ours, in our order
    values: Callable[[dict], dict]  # popular widget values by name -> ours by name
    inputs: dict[str, str] = field(default_factory=dict)  # popular input name -> ours (same name when absent)
    outputs: dict[int, int] = field(default_factory=dict)  # popular output slot -> ours (same slot when absent)
    check: Callable[[dict], list[str]] = lambda w: []  # what cannot be carried over
    drop: tuple[str, ...] = ()  # popular inputs ours does not have (reported when linked)


def _apply_values(w: dict, weight_type=None, composition_weight=None, **extra) -> dict:
    out = {"weight": w.get("weight", 1.0), "weight_type": weight_type or w.get("weight_type", "linear"),
           "start_at": w.get("start_at", 0.0), "end_at": w.get("end_at", 1.0),
           "combine_embeds": w.get("combine_embeds", "concat") if w.get("combine_embeds") in OUR_COMBINE else "concat",
           "embeds_scaling": w.get("embeds_scaling", "V only") if w.get("embeds_scaling") in OUR_SCALING else "V only",
           "composition_weight": 1.0 if composition_weight is None else composition_weight}
    out.update(extra)
    return out


def _apply_check(w: dict) -> list[str]:
    out = []
    if w.get("combine_embeds") not in (None, *OUR_COMBINE):
        out.append(f"combine_embeds {w['combine_embeds']!r} has no counterpart in Apply (use 'Combine IP-Adapter Embeds'); "
                   "set to concat")
    if w.get("embeds_scaling") not in (None, *OUR_SCALING):
        out.append(f"embeds_scaling {w['embeds_scaling']!r} is not available; set to 'V only'")
    if w.get("weight_type") == "strong style and composition" or w.get("expand_style"):
        out.append("expand_style (strong style and composition) is not available; 'style and composition' used")
    return out


def _advanced(w: dict) -> dict:  # precise types through Advanced take the weight as the boost (IPAdapterPlus.py)
    precise = w.get("weight_type") in ("style transfer precise", "composition precise")
    return _apply_values(w, composition_weight=w.get("weight", 1.0) if precise else 1.0)


MAPPINGS: dict[str, Mapping] = {
    "IPAdapterModelLoader": Mapping("PersonalizeIPAdapterLoader", ("ipadapter_file",), ("ipadapter_file",), lambda w: dict(w)),
    "IPAdapterUnifiedLoader": Mapping(
        "PersonalizeIPAdapterUnifiedLoader", ("preset",), ("preset", "lora_strength", "provider"),
        lambda w: {"preset": PRESETS.get(w["preset"], "standard"), "lora_strength": 0.6, "provider": "CPU"},
        check=lambda w: [] if w["preset"] in PRESETS else [f"unknown preset {w['preset']!r}; 'standard' used"],
        drop=("ipadapter",)),
    "IPAdapterUnifiedLoaderFaceID": Mapping(
        "PersonalizeIPAdapterUnifiedLoader", ("preset", "lora_strength", "provider"), ("preset", "lora_strength", "provider"),
        lambda w: {"preset": PRESETS.get(w["preset"], "FaceID"), "lora_strength": w.get("lora_strength", 0.6),
                   "provider": w.get("provider", "CPU") if w.get("provider") in ("CPU", "CUDA") else "CPU"},
        check=lambda w: [] if w["preset"] in PRESETS else [f"unknown preset {w['preset']!r}; 'FaceID' used"],
        drop=("ipadapter",)),
    "IPAdapterInsightFaceLoader": Mapping("PersonalizeFaceAnalysisLoader", ("provider", "model_name"), ("model_pack", "provider"),
                                          lambda w: {"model_pack": w["model_name"], "provider": w["provider"]},
                                          inputs={"model_name": "model_pack"}),
    "IPAdapter": Mapping("PersonalizeIPAdapterApply", ("weight", "start_at", "end_at", "weight_type"), APPLY_WIDGETS,
                         lambda w: _apply_values(w, SIMPLE_WEIGHT_TYPES.get(w.get("weight_type"), "linear"))),
    "IPAdapterAdvanced": Mapping("PersonalizeIPAdapterApply", ("weight", "weight_type", "combine_embeds", "start_at", "end_at",
                                                              "embeds_scaling"), APPLY_WIDGETS, _advanced, check=_apply_check),
    "IPAdapterStyleComposition": Mapping(
        "PersonalizeIPAdapterApply", ("weight_style", "weight_composition", "expand_style", "combine_embeds", "start_at",
                                      "end_at", "embeds_scaling"), APPLY_WIDGETS,
        lambda w: _apply_values({**w, "weight": w["weight_style"]}, "style and composition", w["weight_composition"]),
        inputs={"image_style": "image", "image_composition": "composition_image"}, check=_apply_check),
    "IPAdapterPreciseStyleTransfer": Mapping(
        "PersonalizeIPAdapterApply", ("weight", "style_boost", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
        APPLY_WIDGETS, lambda w: _apply_values(w, "style transfer precise", w["style_boost"]), check=_apply_check),
    "IPAdapterPreciseComposition": Mapping(
        "PersonalizeIPAdapterApply", ("weight", "composition_boost", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
        APPLY_WIDGETS, lambda w: _apply_values(w, "composition precise", w["composition_boost"]), check=_apply_check),
    "IPAdapterBatch": Mapping(
        "PersonalizeIPAdapterApplyBatch", ("weight", "weight_type", "start_at", "end_at", "embeds_scaling", "encode_batch_size"),
        ("weight", "weight_type", "start_at", "end_at", "embeds_scaling", "encode_batch_size"),
        lambda w: {k: v for k, v in _apply_values(w).items() if k not in ("combine_embeds", "composition_weight")}
        | {"encode_batch_size": w.get("encode_batch_size", 0)}, check=_apply_check),
    "IPAdapterMS": Mapping(
        "PersonalizeIPAdapterApplyLayerWeights", ("weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at",
                                                  "end_at", "embeds_scaling", "layer_weights"),
        ("weight", "layer_weights", "layer_indexing", "start_at", "end_at", "combine_embeds", "embeds_scaling"),
        lambda w: {"weight": w["weight"], "layer_weights": w.get("layer_weights") or "", "layer_indexing": "transformer",
                   "start_at": w["start_at"], "end_at": w["end_at"],
                   "combine_embeds": w["combine_embeds"] if w["combine_embeds"] in OUR_COMBINE else "concat",
                   "embeds_scaling": w["embeds_scaling"] if w["embeds_scaling"] in OUR_SCALING else "V only"},
        check=lambda w: _apply_check(w) + ([] if (w.get("layer_weights") or "").strip() else
                                           ["layer_weights is empty: give weights in the converted node"]),
        drop=("insightface",)),
    "IPAdapterCombineEmbeds": Mapping("PersonalizeIPAdapterCombineEmbeds", ("method",), ("method",), lambda w: dict(w)),
    "IPAdapterNoise": Mapping("PersonalizeIPAdapterNoise", ("type", "strength", "blur"), ("type", "strength", "blur", "seed"),
                              lambda w: {**w, "seed": 0}, inputs={"image_optional": "image"},
                              check=lambda w: ["the noise is seeded by the node's seed (0), not by a hash of the image"]),
    "PrepImageForClipVision": Mapping("PersonalizePrepImageForClipVision", ("interpolation", "crop_position", "sharpening"),
                                      ("interpolation", "crop_position", "sharpening", "size"), lambda w: {**w, "size": 224}),
    "IPAdapterRegionalConditioning": Mapping(
        "PersonalizeIPAdapterRegion", ("image_weight", "prompt_weight", "weight_type", "start_at", "end_at"),
        ("image_weight", "prompt_weight", "weight_type", "start_at", "end_at"), lambda w: dict(w)),
    "IPAdapterCombineParams": Mapping("PersonalizeIPAdapterCombineRegions", (), (), lambda w: {},
                                      inputs={f"params_{i}": f"regions_{i}" for i in range(1, 6)}),
    "IPAdapterFromParams": Mapping("PersonalizeIPAdapterApplyRegions", ("combine_embeds", "embeds_scaling"),
                                   ("combine_embeds", "embeds_scaling"),
                                   lambda w: {k: v for k, v in _apply_values(w).items() if k in ("combine_embeds", "embeds_scaling")},
                                   inputs={"ipadapter_params": "regions"}, check=_apply_check,
                                   drop=("image_negative",)),
}
# IPAdapterFaceID: ours takes face embeds, so a Face Embed node is put before it (the image and the face analysis go
# there). Their FaceID node takes the first face insightface returns (sorted by score): "highest score" here.
FACEID_WIDGETS = ("weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling")
OUR_FACEID_WIDGETS = ("weight", "weight_type", "start_at", "end_at", "combine_embeds", "embeds_scaling", "lora_name",
                      "lora_strength", "plus_version", "shortcut_weight")
FACE_EMBED = ("PersonalizeFaceEmbed", ["highest score", 0, 224])  # selection, face_index, crop_size
FACE_ANALYSIS_SLOT = 3  # our unified loader's face_analysis output
# Their nodes with no counterpart here, and why (reported, left as they are).
UNMAPPED = {
    "IPAAdapterFaceIDBatch": "no FaceID batch variant: use 'Apply IP-Adapter FaceID'", "IPAdapterFaceIDKolors": "Kolors is not supported",
    "IPAdapterUnifiedLoaderCommunity": "Kolors / composition community presets: load the file with 'Load IP-Adapter'",
    "IPAdapterEncoder": "our 'IP-Adapter Encode' gives one embeds output (cond + negative) and has no weight / mask",
    "IPAdapterEmbeds": "use 'Apply IP-Adapter' with its embeds input", "IPAdapterEmbedsBatch": "as IPAdapterEmbeds",
    "IPAdapterSaveEmbeds": "its .ipadpt files are pickles; ours are safetensors: save again with our node",
    "IPAdapterLoadEmbeds": "as IPAdapterSaveEmbeds",
    "IPAdapterTiled": "use 'IP-Adapter Encode Tiled' and 'Apply IP-Adapter'", "IPAdapterTiledBatch": "as IPAdapterTiled",
    "IPAdapterStyleCompositionBatch": "no batch variant of style and composition",
    "IPAdapterPreciseStyleTransferBatch": "no batch variant", "IPAdapterPreciseCompositionBatch": "no batch variant",
    "IPAdapterClipVisionEnhancer": "not available", "IPAdapterClipVisionEnhancerBatch": "not available",
    "IPAdapterWeights": "weight scheduling is not available", "IPAdapterCombineWeights": "not available",
    "IPAdapterWeightsFromStrategy": "not available", "IPAdapterPromptScheduleFromWeightsStrategy": "not available",
}
# Inputs of the Apply nodes the unified loader feeds: our loader's CLIP vision output goes there.
CLIP_VISION_SLOT = 2
LOADERS = ("IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderFaceID")


def _faceid(ui: dict, nodes: dict, links: dict, loaders: set, nid: int, report: list[str]) -> None:
    """IPAdapterFaceID -> a Face Embed node (image, face analysis) feeding 'Apply IP-Adapter FaceID'."""
    node = nodes[nid]
    given = dict(zip(FACEID_WIDGETS, node.get("widgets_values") or []))
    inputs = {i["name"]: i for i in node.get("inputs") or []}
    image, face = inputs.get("image"), inputs.get("insightface")
    ipa = inputs.get("ipadapter")
    source = None  # (node, slot) of the face analysis
    if face is not None and face.get("link") is not None:
        link = links[face["link"]]
        source = (link[1], link[2])
        links.pop(face["link"])
    elif ipa is not None and ipa.get("link") is not None and links[ipa["link"]][1] in loaders:
        source = (links[ipa["link"]][1], FACE_ANALYSIS_SLOT)
    if image is None or image.get("link") is None or source is None:
        report.append(f"node {nid} (IPAdapterFaceID): not converted: it needs its image and a face analysis "
                      "(an insightface loader or the unified FaceID loader)")
        return
    new = max(nodes) + 1
    next_link = max(links, default=0) + 1
    image_link = links[image["link"]]
    image_link[3], image_link[4] = new, 1  # the picture now goes to the Face Embed node
    links[next_link] = [next_link, source[0], source[1], new, 0, "PERSONALIZE_FACE_ANALYSIS"]
    links[next_link + 1] = [next_link + 1, new, 0, nid, 0, "PERSONALIZE_FACE_EMBEDS"]
    origin_outputs = nodes[source[0]].setdefault("outputs", [])
    while len(origin_outputs) <= source[1]:
        origin_outputs.append({"name": "face_analysis", "type": "*", "links": []})
    origin_outputs[source[1]].setdefault("links", []).append(next_link)
    origin_outputs[source[1]].update(type="PERSONALIZE_FACE_ANALYSIS", slot_index=source[1])
    kind, widgets = FACE_EMBED
    x, y = (node.get("pos") or [0, 0])[:2]
    embed = {"id": new, "type": kind, "pos": [x - 340, y + 260], "size": [320, 170], "flags": {}, "order": node.get("order", 0),
             "mode": 0, "inputs": [{"name": "face_analysis", "type": "PERSONALIZE_FACE_ANALYSIS", "link": next_link},
                                   {"name": "image", "type": "IMAGE", "link": image_link[0]}],
             "outputs": [{"name": "face_embeds", "type": "PERSONALIZE_FACE_EMBEDS", "links": [next_link + 1], "slot_index": 0},
                         {"name": "face_crop", "type": "IMAGE", "links": []}, {"name": "preview", "type": "IMAGE", "links": []}],
             "properties": {"Node name for S&R": kind}, "widgets_values": list(widgets)}
    ui["nodes"].append(embed)
    nodes[new] = embed
    keep = ("model", "ipadapter", "clip_vision", "attn_mask")
    for i in node["inputs"]:
        if i["name"] not in keep + ("image", "insightface") and i.get("link") is not None:
            report.append(f"node {nid} (IPAdapterFaceID): input {i['name']} dropped (ours has none)")
            links.pop(i["link"], None)
    node["inputs"] = [i for i in node["inputs"] if i["name"] in keep]
    node["inputs"].insert(2, {"name": "face_embeds", "type": "PERSONALIZE_FACE_EMBEDS", "link": next_link + 1})
    values = _apply_values(given)
    values.update(lora_name="none", lora_strength=1.0, plus_version="auto (from file name)",
                  shortcut_weight=given.get("weight_faceidv2", 1.0))
    node["type"] = "PersonalizeIPAdapterFaceIDApply"
    node["widgets_values"] = [values[n] for n in OUR_FACEID_WIDGETS]
    node.setdefault("properties", {})["Node name for S&R"] = node["type"]
    report += [f"node {nid} (IPAdapterFaceID): {w}" for w in _apply_check(given)]
    report.append(f"node {nid}: IPAdapterFaceID -> PersonalizeIPAdapterFaceIDApply, with a Face Embed node (node {new}; "
                  "the face with the highest score, crop 224: set 256 for SDXL FaceID Plus v2)")


def convert(ui: dict) -> tuple[dict, list[str]]:
    """``(converted copy, report lines)``."""
    ui = copy.deepcopy(ui)
    report: list[str] = []
    nodes = {n["id"]: n for n in ui.get("nodes", [])}
    links = {link[0]: link for link in ui.get("links", [])}
    loaders = {nid for nid, n in nodes.items() if n.get("type") in LOADERS}
    for nid in [nid for nid, n in nodes.items() if n.get("type") == "IPAdapterFaceID"]:
        _faceid(ui, nodes, links, loaders, nid, report)
    for nid, node in nodes.items():
        kind = node.get("type")
        m = MAPPINGS.get(kind)
        if m is None:
            if kind in UNMAPPED:
                report.append(f"node {nid} ({kind}): not converted: {UNMAPPED[kind]}")
            continue
        given = dict(zip(m.widgets, node.get("widgets_values") or []))
        values = m.values(given)
        report += [f"node {nid} ({kind}): {w}" for w in m.check(given)]
        node["type"] = m.ours
        node["widgets_values"] = [values[n] for n in m.our_widgets]
        node.setdefault("properties", {})["Node name for S&R"] = m.ours
        for inp in node.get("inputs") or []:
            inp["name"] = m.inputs.get(inp["name"], inp["name"])
            if isinstance(inp.get("widget"), dict):
                inp["widget"]["name"] = m.inputs.get(inp["widget"]["name"], inp["widget"]["name"])
        for inp in [i for i in node.get("inputs") or [] if i["name"] in m.drop]:
            if inp.get("link") is not None:
                report.append(f"node {nid} ({kind}): input {inp['name']} dropped (ours needs none)")
                links.pop(inp["link"], None)
            node["inputs"].remove(inp)
        for out in node.get("outputs") or []:
            if "slot_index" in out:
                out["slot_index"] = m.outputs.get(out["slot_index"], out["slot_index"])
        for link in links.values():
            if link[1] == nid:
                link[2] = m.outputs.get(link[2], link[2])
        report.append(f"node {nid}: {kind} -> {m.ours}")
    next_link = max(links, default=0) + 1
    for nid, node in nodes.items():  # the unified loader's CLIP vision into the nodes that take its adapter
        names = {i["name"]: i for i in node.get("inputs") or []}
        ipa, cv = names.get("ipadapter"), names.get("clip_vision")
        applies = node.get("type", "").startswith("PersonalizeIPAdapterApply") or node.get("type") == "PersonalizeIPAdapterFaceIDApply"
        if not applies or ipa is None or ipa.get("link") is None:
            continue
        origin = links.get(ipa["link"])
        if origin is None or origin[1] not in loaders or (cv is not None and cv.get("link") is not None):
            continue
        if cv is None:
            cv = {"name": "clip_vision", "type": "CLIP_VISION", "link": None}
            node.setdefault("inputs", []).append(cv)
        cv["link"] = next_link
        links[next_link] = [next_link, origin[1], CLIP_VISION_SLOT, nid, node["inputs"].index(cv), "CLIP_VISION"]
        loader_out = nodes[origin[1]].setdefault("outputs", [])
        while len(loader_out) <= CLIP_VISION_SLOT:
            loader_out.append({"name": ["model", "ipadapter", "clip_vision"][len(loader_out)], "type": "*", "links": []})
        loader_out[CLIP_VISION_SLOT].setdefault("links", []).append(next_link)
        loader_out[CLIP_VISION_SLOT].update(name="clip_vision", type="CLIP_VISION", slot_index=CLIP_VISION_SLOT)
        report.append(f"node {nid}: clip_vision linked from the unified loader (node {origin[1]})")
        next_link += 1
    for nid, node in nodes.items():
        if node.get("type") == "PersonalizeIPAdapterRegion" and not any(
                i["name"] == "mask" and i.get("link") is not None for i in node.get("inputs") or []):
            report.append(f"node {nid}: a region needs a mask here (the popular node's was optional): connect one")
    for node in nodes.values():  # no output keeps a link that was dropped
        for out in node.get("outputs") or []:
            if out.get("links"):
                out["links"] = [lid for lid in out["links"] if lid in links]
    ui["links"] = list(links.values())
    ui["last_link_id"] = max([ui.get("last_link_id", 0)] + list(links))
    ui["last_node_id"] = max([ui.get("last_node_id", 0)] + list(nodes))
    return ui, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workflow", help="a UI-format workflow using ComfyUI_IPAdapter_plus' nodes")
    ap.add_argument("out", help="where to write the converted workflow")
    args = ap.parse_args(argv)
    with open(args.workflow) as f:
        ui = json.load(f)
    if "nodes" not in ui:
        raise SystemExit(f"{args.workflow} is not a UI-format workflow (no 'nodes'): save it from the frontend")
    out, report = convert(ui)
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(args.out)) or ".", suffix=".part")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log = logging.getLogger("convert_ipadapter_plus")
    for line in report or ["nothing to convert"]:
        log.info(line)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
