"""Write the example workflows (workflows/*.json in the frontend's UI format, workflows/api/*.json in API format)
from the graphs defined below, using the real node definitions of a ComfyUI checkout for widget order.

    python devtools/make_workflows.py --comfyui /path/to/ComfyUI

Graphs are declared once here, in API form; the UI form is derived (auto-laid-out), so both stay in step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

SD15_CKPT = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL_CKPT = "sd_xl_base_1.0.safetensors"
VIT_H = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
REF_A, REF_B = "personalize_reference.png", "personalize_reference_2.png"
FACE = "personalize_face.png"
# Official IP-Adapter defaults (tencent-ailab/IP-Adapter demo notebooks): quality prompt and negative prompt.
POSITIVE = "best quality, high quality"
NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"


def _sampling(graph: dict, model_ref: list, ckpt_id: str, prompt: str | list, size: int, prefix: str, seed: int = 42,
              clip_ref: list | None = None) -> None:
    clip_ref = clip_ref or [ckpt_id, 1]
    graph.update({
        "20": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip_ref}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": clip_ref}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "23": {"class_type": "KSampler", "inputs": {"model": model_ref, "seed": seed, "steps": 25, "cfg": 7.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["20", 0],
                                                   "negative": ["21", 0], "latent_image": ["22", 0], "denoise": 1.0}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": [ckpt_id, 2]}},
        "25": {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": prefix}},
    })


def _apply(model, ipadapter, image, clip_vision, weight=0.8, weight_type="linear", mask=None) -> dict:
    inputs = {"model": model, "ipadapter": ipadapter, "weight": weight, "weight_type": weight_type, "start_at": 0.0,
              "end_at": 1.0, "combine_embeds": "concat", "embeds_scaling": "V only", "image": image, "clip_vision": clip_vision,
              "composition_weight": 1.0}
    if mask is not None:
        inputs["attn_mask"] = mask
    return {"class_type": "PersonalizeIPAdapterApply", "inputs": inputs}


def basic_sd15() -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H}},
        "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
        "5": _apply(["1", 0], ["2", 0], ["4", 0], ["3", 0]),
    }
    _sampling(g, ["5", 0], "1", POSITIVE, 512, "personalize/ipadapter_sd15")
    return g


def style_transfer_sdxl() -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CKPT}},
        "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter-plus_sdxl_vit-h.safetensors"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H}},
        "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
        "5": _apply(["1", 0], ["2", 0], ["4", 0], ["3", 0], weight=1.0, weight_type="style transfer"),
    }
    _sampling(g, ["5", 0], "1", "a cat sitting on a chair, " + POSITIVE, 1024, "personalize/ipadapter_sdxl_style")
    return g


def two_references_masked_sd15() -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter-plus_sd15.safetensors"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H}},
        "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
        "5": {"class_type": "LoadImage", "inputs": {"image": REF_B}},
        # left half white: a black 512x512 canvas plus a white 256x512 block at x=0
        "6": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 512, "height": 512}},
        "7": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 256, "height": 512}},
        "8": {"class_type": "MaskComposite", "inputs": {"destination": ["6", 0], "source": ["7", 0], "x": 0, "y": 0, "operation": "add"}},
        "9": {"class_type": "InvertMask", "inputs": {"mask": ["8", 0]}},
        "10": _apply(["1", 0], ["2", 0], ["4", 0], ["3", 0], weight=0.7, mask=["8", 0]),
        "11": _apply(["10", 0], ["2", 0], ["5", 0], ["3", 0], weight=0.7, mask=["9", 0]),
    }
    _sampling(g, ["11", 0], "1", "two people side by side, " + POSITIVE, 512, "personalize/ipadapter_two_refs")
    _title(g, {"4": "Reference for the LEFT half", "5": "Reference for the RIGHT half", "6": "Canvas (black)",
               "7": "Left half block (white)", "8": "Mask: left half", "9": "Mask: right half",
               "10": "IP-Adapter: left reference -> left half", "11": "IP-Adapter: right reference -> right half"})
    return g


def train_lora_sd15() -> dict:
    """Train a SuDe + PALP LoRA and token [V] from one reference image, then sample the subject in a target style
    (one graph). The prompts take the trainer's CLIP output, so they are encoded after training, when the embedding
    file exists."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
        "5": {"class_type": "PersonalizeLoRATrainer", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["4", 0], "subject_token": "sks",
            "class_word": "dog", "palp_prompts": "a sketch of a dog\na watercolor painting of a dog", "steps": 500,
            "learning_rate": 1e-4, "rank": 16, "sude_weight": 0.4, "palp_weight": 1.0, "prior_weight": 0.0, "seed": 0,
            "save_name": "personalize_sks_dog", "overwrite": False, "resume": False, "image_folder": "", "prior_count": 8,
            "targets": "attention (q, k, v, out)", "palp_alpha": 15.0, "palp_beta": 7.5, "batch_size": 1,
            "grad_accumulation": 1, "gradient_checkpointing": False, "mixed_precision": "no",
            "validation_prompt": "a photo of {token} {class_word}", "validate_every": 100, "validation_steps": 10,
            "checkpoint_every": 100, "train_token": True, "token_learning_rate": 5e-4}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}},
    }
    # the sampling prompt names the subject through the trainer's own 'subject' output (embedding:<save_name> when the
    # token is trained): renaming save_name just works
    g["30"] = {"class_type": "StringReplace", "_meta": {"title": "Prompt naming the trained subject"},
               "inputs": {"string": "a sketch of {subject} dog, " + POSITIVE, "find": "{subject}", "replace": ["5", 5]}}
    _sampling(g, ["5", 0], "1", ["30", 0], 512, "personalize/train_lora_sd15", clip_ref=["5", 4])
    _title(g, {"5": "Train the subject's LoRA + token (SuDe + PALP)", "6": "Loss curve", "7": "Validation samples",
               "4": "Subject image"})
    return g


def _title(graph: dict, titles: dict) -> None:
    """Titles that say what each node is for (the frontend shows them; the API form keeps them in _meta)."""
    for nid, title in titles.items():
        graph[nid]["_meta"] = {"title": title}


def faceid_plus_v2_sd15() -> dict:
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter-faceid-plusv2_sd15.bin"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H}},
        "4": {"class_type": "LoadImage", "inputs": {"image": FACE}},
        "6": {"class_type": "PersonalizeFaceAnalysisLoader", "inputs": {"model_pack": "buffalo_l", "provider": "CPU"}},
        "7": {"class_type": "PersonalizeFaceEmbed", "inputs": {"face_analysis": ["6", 0], "image": ["4", 0],
                                                             "selection": "largest", "face_index": 0, "crop_size": 224}},
        "5": {"class_type": "PersonalizeIPAdapterFaceIDApply", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "face_embeds": ["7", 0], "weight": 0.8, "weight_type": "linear",
            "start_at": 0.0, "end_at": 1.0, "combine_embeds": "concat", "embeds_scaling": "V only", "clip_vision": ["3", 0],
            "lora_name": "ip-adapter-faceid-plusv2_sd15_lora.safetensors", "lora_strength": 0.6,
            "plus_version": "auto (from file name)", "shortcut_weight": 1.0}},
    }
    _sampling(g, ["5", 0], "1", "photo of a person in a garden, " + POSITIVE, 512, "personalize/faceid_plusv2_sd15")
    return g


PULID_FILE = "pulid_v1.1.safetensors"
EVA_FILE = "EVA02_CLIP_L_336_psz14_s6B.pt"
PARSING_FILE = "parsing_bisenet.pth"
FACE_B = "personalize_face_2.png"


def _pulid_loaders(g: dict) -> None:
    g.update({
        "30": {"class_type": "PersonalizePuLIDLoader", "inputs": {"pulid_file": PULID_FILE}},
        "31": {"class_type": "PersonalizeEVACLIPLoader", "inputs": {"eva_clip_file": EVA_FILE}},
        "32": {"class_type": "PersonalizeFaceParsingLoader", "inputs": {"parsing_file": PARSING_FILE}},
        "33": {"class_type": "PersonalizeFaceAnalysisLoader", "inputs": {"model_pack": "antelopev2", "provider": "CPU"}},
    })


def _pulid_encode(image) -> dict:
    return {"class_type": "PersonalizePuLIDEncode", "inputs": {"face_analysis": ["33", 0], "eva_clip": ["31", 0],
                                                              "face_parsing": ["32", 0], "image": image,
                                                              "selection": "largest", "face_index": 0}}


def _pulid_apply(model, embeds, weight=0.8, mask=None) -> dict:
    inputs = {"model": model, "pulid": ["30", 0], "embeds": embeds, "method": "fidelity", "weight": weight,
              "start_at": 0.0, "end_at": 1.0, "id_mix": False}
    if mask is not None:
        inputs["attn_mask"] = mask
    return {"class_type": "PersonalizePuLIDApply", "inputs": inputs}


def pulid_sdxl() -> dict:
    """One identity from one face photo (PuLID v1.1, fidelity)."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CKPT}},
         "4": {"class_type": "LoadImage", "inputs": {"image": FACE}}}
    _pulid_loaders(g)
    g.update({"5": _pulid_encode(["4", 0]), "6": _pulid_apply(["1", 0], ["5", 0]),
              "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}}})
    _sampling(g, ["6", 0], "1", "portrait of a person as a knight, " + POSITIVE, 1024, "personalize/pulid_sdxl")
    return g


def pulid_two_identities_sdxl() -> dict:
    """Two identities in one picture, each masked to one half."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CKPT}},
         "4": {"class_type": "LoadImage", "inputs": {"image": FACE}},
         "8": {"class_type": "LoadImage", "inputs": {"image": FACE_B}},
         "10": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 1024, "height": 1024}},
         "11": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 512, "height": 1024}},
         "12": {"class_type": "MaskComposite", "inputs": {"destination": ["10", 0], "source": ["11", 0], "x": 0, "y": 0,
                                                          "operation": "add"}},
         "13": {"class_type": "InvertMask", "inputs": {"mask": ["12", 0]}}}
    _pulid_loaders(g)
    g.update({"5": _pulid_encode(["4", 0]), "9": _pulid_encode(["8", 0]),
              "6": _pulid_apply(["1", 0], ["5", 0], mask=["12", 0]), "14": _pulid_apply(["6", 0], ["9", 0], mask=["13", 0])})
    _sampling(g, ["14", 0], "1", "two people side by side in a park, " + POSITIVE, 1024, "personalize/pulid_two_ids")
    _title(g, {"4": "Face for the LEFT half", "8": "Face for the RIGHT half", "10": "Canvas (black)",
               "11": "Left half block (white)", "12": "Mask: left half", "13": "Mask: right half",
               "5": "PuLID Encode: left face", "9": "PuLID Encode: right face", "6": "PuLID: left face -> left half",
               "14": "PuLID: right face -> right half"})
    return g


def pulid_ipadapter_style_sdxl() -> dict:
    """An identity (PuLID) in the style of a reference picture (IP-Adapter Plus, style transfer): both on the same
    cross-attention layers."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SDXL_CKPT}},
         "4": {"class_type": "LoadImage", "inputs": {"image": FACE}},
         "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter-plus_sdxl_vit-h.safetensors"}},
         "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H}},
         "8": {"class_type": "LoadImage", "inputs": {"image": REF_A}}}
    _pulid_loaders(g)
    g.update({"5": _pulid_encode(["4", 0]), "6": _pulid_apply(["1", 0], ["5", 0]),
              "9": _apply(["6", 0], ["2", 0], ["8", 0], ["3", 0], weight=1.0, weight_type="style transfer")})
    _sampling(g, ["9", 0], "1", "portrait of a person, " + POSITIVE, 1024, "personalize/pulid_ipadapter_style")
    return g


E4T_NAME = "e4t-diffusion-ffhq-celebahq-v1"  # mkshing's public face model (a folder in models/e4t)


def e4t_tune_sd15() -> dict:
    """E4T: tune the public face encoder on one face (15 steps, the reference), then sample the tuned model with the
    tuned encoder's word embedding recomputed at every step. The guidance is the reference inference script's
    CFG 7.5 of the reference pipeline; the negative is the empty prompt (the Apply node's negative output)."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "PersonalizeE4TLoader", "inputs": {"e4t_name": E4T_NAME}},
        "4": {"class_type": "LoadImage", "inputs": {"image": FACE}},
        "5": {"class_type": "PersonalizeE4TTune", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "e4t": ["2", 0], "image": ["4", 0], "steps": 15,
            "learning_rate": 1.6e-5, "batch_size": 16, "reg_lambda": 1e-4,
            "mode": "reference (all UNet weights + offsets + encoder)", "seed": 0, "save_name": "e4t_tuned_face",
            "resume": False, "lora_rank": 16, "resolution": 512, "gradient_checkpointing": True,
            "mixed_precision": "no", "max_grad_norm": 1.0, "checkpoint_every": 0, "overwrite": False}},
        "6": {"class_type": "PreviewImage", "inputs": {"images": ["5", 3]}},
        "7": {"class_type": "PersonalizeE4TApply", "inputs": {
            "model": ["5", 0], "clip": ["1", 1], "e4t": ["5", 1], "image": ["4", 0],
            "prompt": "a photo of *s as a watercolor painting", "mode": "per step (reference)"}},
        "22": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "23": {"class_type": "KSampler", "inputs": {"model": ["7", 0], "seed": 42, "steps": 30, "cfg": 7.5,
                                                   "sampler_name": "euler", "scheduler": "normal", "positive": ["7", 1],
                                                   "negative": ["7", 2], "latent_image": ["22", 0], "denoise": 1.0}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}},
        "25": {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": "personalize/e4t_tune_sd15"}},
    }
    return g


def preset_loader_sd15() -> dict:
    """The unified loader: one node picks the adapter and the CLIP vision model of a preset for the model given."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "PersonalizeIPAdapterUnifiedLoader", "inputs": {"model": ["1", 0], "preset": "plus",
                                                                            "lora_strength": 0.6, "provider": "CPU"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
        "5": _apply(["2", 0], ["2", 1], ["4", 0], ["2", 2]),
    }
    _sampling(g, ["5", 0], "1", POSITIVE, 512, "personalize/ipadapter_preset")
    _title(g, {"2": "Unified loader: preset"})
    return g


def animation_unfold_sd15() -> dict:
    """A batch of frames, each with its own reference (unfold: reference i for latent i; the last repeats)."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H}},
        "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
        "8": {"class_type": "LoadImage", "inputs": {"image": REF_B}},
        "9": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["8", 0]}},
        "5": {"class_type": "PersonalizeIPAdapterApplyBatch", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "weight": 0.8, "weight_type": "linear", "start_at": 0.0,
            "end_at": 1.0, "embeds_scaling": "V only", "encode_batch_size": 0, "image": ["9", 0], "clip_vision": ["3", 0]}},
    }
    _sampling(g, ["5", 0], "1", POSITIVE, 512, "personalize/ipadapter_unfold")
    g["22"]["inputs"]["batch_size"] = 4
    _title(g, {"9": "References: frame 0, frame 1 (and after)", "5": "Apply IP-Adapter Batch (unfold)",
               "22": "4 frames"})
    return g


def regional_two_subjects_sd15() -> dict:
    """Two regions, each with its own reference and its own text, beside a prompt for the whole picture."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15_CKPT}},
        "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": "ip-adapter-plus_sd15.safetensors"}},
        "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": VIT_H}},
        "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
        "8": {"class_type": "LoadImage", "inputs": {"image": REF_B}},
        "10": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 512, "height": 512}},
        "11": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 256, "height": 512}},
        "12": {"class_type": "MaskComposite", "inputs": {"destination": ["10", 0], "source": ["11", 0], "x": 0, "y": 0,
                                                         "operation": "add"}},
        "13": {"class_type": "InvertMask", "inputs": {"mask": ["12", 0]}},
        "30": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red vintage car", "clip": ["1", 1]}},
        "31": {"class_type": "CLIPTextEncode", "inputs": {"text": "a small sailing boat", "clip": ["1", 1]}},
    }
    for nid, image, mask, text in (("14", "4", "12", "30"), ("15", "8", "13", "31")):
        g[nid] = {"class_type": "PersonalizeIPAdapterRegion", "inputs": {
            "image": [image, 0], "mask": [mask, 0], "image_weight": 0.8, "prompt_weight": 1.0, "weight_type": "linear",
            "start_at": 0.0, "end_at": 1.0, "positive": [text, 0]}}
    g.update({
        "16": {"class_type": "PersonalizeIPAdapterCombineRegions", "inputs": {"regions_1": ["14", 0], "regions_2": ["15", 0]}},
        "17": {"class_type": "PersonalizeIPAdapterApplyRegions", "inputs": {
            "model": ["1", 0], "ipadapter": ["2", 0], "clip_vision": ["3", 0], "regions": ["16", 0],
            "combine_embeds": "concat", "embeds_scaling": "V only"}},
    })
    _sampling(g, ["17", 0], "1", "two things side by side by a lake, " + POSITIVE, 512, "personalize/ipadapter_regions")
    g["18"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["20", 0], "conditioning_2": ["14", 1]}}
    g["19"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["18", 0], "conditioning_2": ["15", 1]}}
    g["23"]["inputs"]["positive"] = ["19", 0]
    _title(g, {"4": "Reference for the LEFT half", "8": "Reference for the RIGHT half", "12": "Mask: left half",
               "13": "Mask: right half", "14": "Region: left (car)", "15": "Region: right (boat)",
               "20": "Prompt for the whole picture", "30": "Text for the left half", "31": "Text for the right half"})
    return g


FLUX_CKPT = "flux1-dev-fp8.safetensors"  # Comfy-Org's all-in-one Flux.1-dev checkpoint (model, CLIP-L + T5-XXL, VAE)
PULID_FLUX_FILE = "pulid_flux_v0.9.1.safetensors"
XLABS_FILE = "flux-ip-adapter-v2.safetensors"  # XLabs-AI/flux-ip-adapter-v2's ip_adapter.safetensors, renamed
CLIP_L = "clip_vision_l.safetensors"  # openai/clip-vit-large-patch14, the encoder XLabs trained with


def _flux_sampling(graph: dict, model_ref: list, prompt: str, guidance: float, prefix: str, seed: int = 42) -> None:
    """Flux.1-dev as ComfyUI's Flux examples sample it: the distilled guidance in the conditioning (FluxGuidance), cfg 1
    (one conditional pass: PuLID-FLUX's official "fake CFG"), euler / simple, 20 steps, 1024 x 1024."""
    graph.update({
        "20": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["20", 0], "guidance": guidance}},
        "21": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["20", 0]}},
        "22": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "23": {"class_type": "KSampler", "inputs": {"model": model_ref, "seed": seed, "steps": 20, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "positive": ["26", 0],
                                                   "negative": ["21", 0], "latent_image": ["22", 0], "denoise": 1.0}},
        "24": {"class_type": "VAEDecode", "inputs": {"samples": ["23", 0], "vae": ["1", 2]}},
        "25": {"class_type": "SaveImage", "inputs": {"images": ["24", 0], "filename_prefix": prefix}},
    })


def pulid_flux() -> dict:
    """One identity on Flux.1-dev with PuLID-FLUX v0.9.1: the official app's defaults (id weight 1, from step 0,
    guidance 4, one conditional pass)."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FLUX_CKPT}},
         "4": {"class_type": "LoadImage", "inputs": {"image": FACE}}}
    _pulid_loaders(g)
    g["30"] = {"class_type": "PersonalizePuLIDLoader", "inputs": {"pulid_file": PULID_FLUX_FILE}}
    g.update({"5": _pulid_encode(["4", 0]),
              "6": {"class_type": "PersonalizePuLIDFluxApply", "inputs": {
                  "model": ["1", 0], "pulid": ["30", 0], "embeds": ["5", 0], "weight": 1.0, "start_step": 0,
                  "start_at": 0.0, "end_at": 1.0, "images": "first (official)"}},
              "7": {"class_type": "PreviewImage", "inputs": {"images": ["5", 1]}}})
    _flux_sampling(g, ["6", 0], "portrait of a person as a knight, cinematic light", 4.0, "personalize/pulid_flux")
    _title(g, {"6": "Apply PuLID-FLUX (official defaults)", "21": "Negative (unused at cfg 1)"})
    return g


def ipadapter_xlabs_flux() -> dict:
    """An image prompt on Flux.1-dev with XLabs' IP-Adapter v2 (CLIP ViT-L/14)."""
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": FLUX_CKPT}},
         "2": {"class_type": "PersonalizeIPAdapterLoader", "inputs": {"ipadapter_file": XLABS_FILE}},
         "3": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_L}},
         "4": {"class_type": "LoadImage", "inputs": {"image": REF_A}},
         "5": {"class_type": "PersonalizeIPAdapterFluxApply", "inputs": {
             "model": ["1", 0], "ipadapter": ["2", 0], "weight": 0.8, "start_at": 0.0, "end_at": 1.0,
             "combine_embeds": "concat", "image": ["4", 0], "clip_vision": ["3", 0]}}}
    _flux_sampling(g, ["5", 0], "a cat in the style of the reference picture", 3.5, "personalize/ipadapter_xlabs_flux")
    _title(g, {"21": "Negative (unused at cfg 1)"})
    return g


WORKFLOWS = {
    "ipadapter_sd15_basic": basic_sd15,
    "ipadapter_sdxl_style_transfer": style_transfer_sdxl,
    "ipadapter_sd15_two_references_masked": two_references_masked_sd15,
    "ipadapter_faceid_plusv2_sd15": faceid_plus_v2_sd15,
    "train_lora_sd15_sude_palp": train_lora_sd15,
    "pulid_sdxl": pulid_sdxl,
    "pulid_sdxl_two_identities_masked": pulid_two_identities_sdxl,
    "pulid_sdxl_ipadapter_style": pulid_ipadapter_style_sdxl,
    "e4t_tune_sd15": e4t_tune_sd15,
    "ipadapter_sd15_preset_loader": preset_loader_sd15,
    "ipadapter_sd15_animation_unfold": animation_unfold_sd15,
    "ipadapter_sd15_regional_two_subjects": regional_two_subjects_sd15,
    "pulid_flux": pulid_flux,
    "ipadapter_xlabs_flux": ipadapter_xlabs_flux,
}


# Public sources of the model files the examples name (the repositories and releases README.md lists), for the
# frontend's missing-models dialog (a loader node's properties.models: name, url, directory).
_HF = "https://huggingface.co/"
MODEL_SOURCES = {
    SD15_CKPT: _HF + "Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly-fp16.safetensors",
    SDXL_CKPT: _HF + "stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
    VIT_H: _HF + "h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors",
    "ip-adapter_sd15.safetensors": _HF + "h94/IP-Adapter/resolve/main/models/ip-adapter_sd15.safetensors",
    "ip-adapter-plus_sd15.safetensors": _HF + "h94/IP-Adapter/resolve/main/models/ip-adapter-plus_sd15.safetensors",
    "ip-adapter-plus_sdxl_vit-h.safetensors":
        _HF + "h94/IP-Adapter/resolve/main/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
    "ip-adapter-faceid-plusv2_sd15.bin": _HF + "h94/IP-Adapter-FaceID/resolve/main/ip-adapter-faceid-plusv2_sd15.bin",
    "ip-adapter-faceid-plusv2_sd15_lora.safetensors":
        _HF + "h94/IP-Adapter-FaceID/resolve/main/ip-adapter-faceid-plusv2_sd15_lora.safetensors",
    "pulid_v1.1.safetensors": _HF + "guozinan/PuLID/resolve/main/pulid_v1.1.safetensors",
    "EVA02_CLIP_L_336_psz14_s6B.pt": _HF + "QuanSun/EVA-CLIP/resolve/main/EVA02_CLIP_L_336_psz14_s6B.pt",
    "parsing_bisenet.pth": "https://github.com/xinntao/facexlib/releases/download/v0.2.0/parsing_bisenet.pth",
    FLUX_CKPT: _HF + "Comfy-Org/flux1-dev/resolve/main/flux1-dev-fp8.safetensors",
    PULID_FLUX_FILE: _HF + "guozinan/PuLID/resolve/main/pulid_flux_v0.9.1.safetensors",
    XLABS_FILE: _HF + "XLabs-AI/flux-ip-adapter-v2/resolve/main/ip_adapter.safetensors",
    CLIP_L: _HF + "openai/clip-vit-large-patch14/resolve/main/model.safetensors",
}
# Model folders (a pack of files, not one file): where to get them, for the note each workflow carries.
FOLDER_SOURCES = {
    "antelopev2": "insightface's antelopev2 pack (unzipped: the .onnx files directly in the folder)",
    "buffalo_l": "insightface's buffalo_l pack (unzipped: the .onnx files directly in the folder)",
    "e4t-diffusion-ffhq-celebahq-v1": "config.json, encoder.pt, weight_offsets.pt of mshing/e4t-diffusion-ffhq-celebahq-v1 "
                                      "on Hugging Face",
}
NOTE_WIDTH = 420  # the note stands under the result, in the last column


def models_note(api: dict) -> str:
    """The text of the note node listing every model file and folder the workflow needs and where it goes."""
    import run_workflow

    lines = ["Model files this workflow needs (ComfyUI/models/...):"]
    for _, _, folder, value in run_workflow.model_refs(api):
        if folder == "ipadapter_preset":  # the unified loader: the files its preset looks for, per model kind
            import pack_alias

            pack_alias.register()
            from comfyui_personalize.models.layers import LAYOUT_NAMES
            from comfyui_personalize.models.presets import CLIP_VISION_NAMES, PRESETS

            p = PRESETS[value]
            for layout, names in p.names.items():
                files = [("ipadapter", n) for n in names] + [("clip_vision", n) for n in CLIP_VISION_NAMES.get(
                    p.clip.get(layout), ())] + [("loras", n) for n in p.lora_names.get(layout, ())]
                line = (f"- the unified loader's preset '{value}' on {LAYOUT_NAMES[layout]}: " + ", ".join(f"{f}/{n}" for f, n in files)
                        + "".join(f"\n  {MODEL_SOURCES[n]}" for _, n in files if n in MODEL_SOURCES))
                lines.append(line)
            continue
        where = f"{folder}/models/{value}/" if folder == "insightface" else f"{folder}/{value}" + (
            "/" if folder == "e4t" else "")
        source = MODEL_SOURCES.get(value) or FOLDER_SOURCES.get(value, "")
        line = f"- {where}" + (f"\n  {source}" if source else "")
        if line not in lines:
            lines.append(line)
    images = sorted({n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage"})
    lines.append("Input pictures (ComfyUI/input): " + ", ".join(images) + " (any picture of yours)")
    return "\n".join(lines)


# Layout of the UI form (canvas units). The frontend draws a node's title above its position; Load Image grows to
# show its picture when it loads, and the preview nodes get a size at which their pictures can be read.
NODE_WIDTH, LEFT, TOP, GAP, TITLE_HEIGHT = 320, 40, 60, 50, 30
NODE_SIZES = {"LoadImage": (320, 360), "PreviewImage": (420, 440), "SaveImage": (420, 440)}
MAX_COLUMN_HEIGHT = 1100
# The default view shows the whole graph on a 1600 x 1000 window (its canvas: 1536 x 922 beside the side bar), at most 0.8.
# Below MIN_SCALE the frontend draws nodes without their text (its low-quality zoom threshold, about 0.6 in 1.27).
VIEW, MAX_SCALE, MIN_SCALE = (1480, 860), 0.8, 0.6


def import_folder(class_type: str, name: str) -> str:
    import run_workflow

    return run_workflow.MODEL_INPUTS.get((class_type, name)) or run_workflow.MODEL_INPUTS[("*", name)]


def api_to_ui(api: dict) -> dict:
    """Frontend (litegraph 0.4) form of an API graph, laid out in columns by graph depth."""
    import comfy_host
    import nodes

    depth: dict[str, int] = {}

    def node_depth(nid: str) -> int:
        if nid not in depth:
            links = [v for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((node_depth(v[0]) for v in links), default=-1)
        return depth[nid]

    order = sorted(api, key=lambda n: (node_depth(n), int(n)))
    links, ui_nodes, column_y = [], {}, {}
    for idx, nid in enumerate(order):
        node = api[nid]
        cls = nodes.NODE_CLASS_MAPPINGS[node["class_type"]]
        specs = comfy_host._input_specs(node["class_type"])
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        widgets, inputs = [], []
        for name, typ, opts, _optional in specs:
            value = node["inputs"].get(name)
            if comfy_host._is_widget(typ, opts) and isinstance(value, list):  # a widget fed by a link
                widgets.append(opts.get("default", ""))
                link_id = len(links) + 1
                links.append([link_id, int(value[0]), value[1], int(nid), len(inputs), typ])
                inputs.append({"name": name, "type": typ, "widget": {"name": name}, "link": link_id})
            elif comfy_host._is_widget(typ, opts):
                widgets.append(value if value is not None else opts.get("default"))
                if comfy_host._has_control_widget(name, typ, opts):
                    widgets.append("fixed")
                if comfy_host._has_upload_widget(opts):
                    widgets.append("image")
            else:
                inputs.append({"name": name, "type": typ, "link": None})
                if isinstance(value, list):
                    link_id = len(links) + 1
                    links.append([link_id, int(value[0]), value[1], int(nid), len(inputs) - 1, typ])
                    inputs[-1]["link"] = link_id
        width, height = NODE_SIZES.get(node["class_type"], (NODE_WIDTH, 0))
        height = max(height, 60 + 26 * (len(widgets) + max(len(inputs), len(names))))
        column = (node_depth(nid), 0)
        y = column_y.get(column, TOP)
        while y > TOP and y + height > MAX_COLUMN_HEIGHT:  # a tall column continues beside itself
            column = (column[0], column[1] + 1)
            y = column_y.get(column, TOP)
        column_y[column] = y + height + TITLE_HEIGHT + GAP
        ui_nodes[nid] = {
            "id": int(nid), "type": node["class_type"], "pos": [column, y], "size": [width, height], "flags": {},
            "order": idx, "mode": 0, "inputs": inputs,
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets,
        }
        if node.get("_meta", {}).get("title"):
            ui_nodes[nid]["title"] = node["_meta"]["title"]
        sources = [(name, value, import_folder(node["class_type"], name)) for name, value in node["inputs"].items()
                   if isinstance(value, str) and value in MODEL_SOURCES]
        if sources:
            ui_nodes[nid]["properties"]["models"] = [{"name": value, "url": MODEL_SOURCES[value], "directory": folder}
                                                     for _, value, folder in sources]
    for link_id, src, slot, *_ in links:
        ui_nodes[str(src)]["outputs"][slot]["links"].append(link_id)
    note_text = models_note(api)
    note_height = 60 + 17 * sum(1 + len(line) // 52 for line in note_text.splitlines())
    columns = sorted({n["pos"][0] for n in ui_nodes.values()})
    x, column_x = LEFT, {}
    for d in columns:  # each column as wide as its widest node
        column_x[d] = x
        x += max(n["size"][0] for n in ui_nodes.values() if n["pos"][0] == d) + GAP
    last = columns[-1]
    note_y = max(n["pos"][1] + n["size"][1] for n in ui_nodes.values() if n["pos"][0] == last) + TITLE_HEIGHT + GAP
    for n in ui_nodes.values():
        n["pos"][0] = column_x[n["pos"][0]]
    note_id = max(int(n) for n in api) + 1
    ui_nodes[str(note_id)] = {"id": note_id, "type": "Note", "title": "Models and files", "pos": [column_x[last], note_y],
                              "size": [NOTE_WIDTH, note_height], "flags": {}, "order": len(order), "mode": 0,
                              "inputs": [], "outputs": [], "properties": {}, "widgets_values": [note_text],
                              "color": "#432", "bgcolor": "#653"}
    order = order + [str(note_id)]
    right = max(n["pos"][0] + n["size"][0] for n in ui_nodes.values()) + LEFT
    bottom = max(n["pos"][1] + n["size"][1] for n in ui_nodes.values()) + LEFT
    # the whole graph in the default view, unless it would be drawn too small to read: then the right part (the
    # sampler and the result) at the smallest readable scale
    scale = round(max(MIN_SCALE, min(MAX_SCALE, VIEW[0] / right, VIEW[1] / bottom)), 3)
    offset = [0, 0] if right * scale <= VIEW[0] else [round(VIEW[0] / scale - right, 1), 0]
    return {"last_node_id": note_id, "last_link_id": len(links),
            "nodes": [ui_nodes[n] for n in order], "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": scale, "offset": offset}}, "version": 0.4}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default: $COMFYUI_PATH)")
    ap.add_argument("--out", default=os.path.join(ROOT, "workflows"))
    args = ap.parse_args(argv)
    if not args.comfyui:
        ap.error("--comfyui or COMFYUI_PATH is required")
    import comfy_host

    comfy_host.bootstrap(args.comfyui)
    comfy_host.load_pack(ROOT)
    os.makedirs(os.path.join(args.out, "api"), exist_ok=True)
    for name, build in WORKFLOWS.items():
        api = build()
        for path, data in ((os.path.join(args.out, "api", name + ".json"), api), (os.path.join(args.out, name + ".json"), api_to_ui(api))):
            with open(path, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
            print(path)


if __name__ == "__main__":
    main()
