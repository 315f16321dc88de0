"""Tier 2: the face-analysis nodes inside a real ComfyUI (folder registration, loader, executor, error reporting)."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: face node tests skipped")
pytest.importorskip("onnx", reason="onnx not installed: the tiny ONNX face models cannot be written")

import tiny_onnx_faces as tiny  # noqa: E402

SQUARES = [(128, 64, 48, 255), (400, 200, 24, 255), (64, 320, 96, 220)]


@pytest.fixture(scope="module")
def pack(comfy, tmp_path_factory):
    maps = comfy.host.load_pack(comfy.repo_root)
    prefix = next(k[: -len(".nodes.face")] for k in sys.modules if k.endswith("ComfyUI-Personalize.nodes.face"))
    import folder_paths
    root = str(tmp_path_factory.mktemp("insightface"))
    tiny.write_tiny_pack(root, "antelopev2", extras=True)
    nested = str(tmp_path_factory.mktemp("insightface_nested"))
    tiny.write_tiny_pack(nested, "nestedpack", nested=True)
    folder_paths.add_model_folder_path("insightface", root)
    folder_paths.add_model_folder_path("insightface", nested)
    return types.SimpleNamespace(maps=maps, root=root, nodes=sys.modules[prefix + ".nodes.face"],
                                 face=sys.modules[prefix + ".models.face"])


def image_tensor(squares=SQUARES, h=480, w=640):
    return torch.from_numpy(tiny.squares_image(h, w, squares)).float().div(255)[None]


def test_loader_lists_packs_and_providers(pack):
    spec = pack.maps["PersonalizeFaceAnalysisLoader"].INPUT_TYPES()["required"]
    assert spec["model_pack"][0][0] == "antelopev2"  # found packs first, then the known names
    assert "buffalo_l" in spec["model_pack"][0] and "nestedpack" in spec["model_pack"][0]
    assert spec["provider"][0] == ["CPU", "CUDA", "ROCm", "DirectML", "CoreML"]


def test_embed_node_gives_exact_boxes(pack):
    fa = pack.maps["PersonalizeFaceAnalysisLoader"]().load("antelopev2", "CPU")[0]
    assert pack.maps["PersonalizeFaceAnalysisLoader"]().load("antelopev2", "CPU")[0] is fa  # sessions cached
    node = pack.maps["PersonalizeFaceEmbed"]()
    image = torch.cat([image_tensor(), image_tensor(SQUARES[:1])])
    embeds, crop, preview = node.embed(fa, image, "index", 0, 224)
    assert embeds.bbox.tolist() == [[64, 320, 160, 416], [128, 64, 176, 112]]
    np.testing.assert_allclose(embeds.kps[1].numpy(), tiny.expected_kps(128, 64, 48), atol=1e-4)
    assert crop.shape == (2, 224, 224, 3) and preview.shape == image.shape
    assert embeds.embedding.shape == (2, 512) and torch.allclose(embeds.normed.norm(dim=1), torch.ones(2))
    # the chosen box is drawn in green on the preview
    top_edge = (preview[0, 320, 70:150] * 255).round()
    assert torch.all(top_edge[:, 1] > 200) and torch.all(top_edge[:, 0] < 50)
    largest = node.embed(fa, image[:1], "largest", 0, 112)[0]
    assert largest.bbox.tolist() == [[64, 320, 160, 416]] and largest.crops.shape == (1, 112, 112, 3)


def _prompt(image_nodes, pack_name="antelopev2", selection="largest"):
    prompt = {
        "1": {"class_type": "PersonalizeFaceAnalysisLoader", "inputs": {"model_pack": pack_name, "provider": "CPU"}},
        "3": {"class_type": "PersonalizeFaceEmbed", "inputs": {"face_analysis": ["1", 0], "image": ["img", 0],
                                                               "selection": selection, "face_index": 0, "crop_size": 112}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 1]}},
        "5": {"class_type": "PreviewImage", "inputs": {"images": ["3", 2]}},
    }
    prompt.update(image_nodes)
    return prompt


def _black(w=640, h=480):
    return {"class_type": "EmptyImage", "inputs": {"width": w, "height": h, "batch_size": 1, "color": 0}}


def test_graph_runs_in_the_executor(comfy, pack):
    images = {
        "bg": _black(),
        "sq": {"class_type": "EmptyImage", "inputs": {"width": 48, "height": 48, "batch_size": 1, "color": 0xFFFFFF}},
        "img": {"class_type": "ImageCompositeMasked", "inputs": {"destination": ["bg", 0], "source": ["sq", 0],
                                                                "x": 128, "y": 64, "resize_source": False}},
    }
    result = comfy.host.run_prompt(_prompt(images))
    assert len(comfy.host.output_image_paths(result)) == 2


@pytest.mark.parametrize("case, expected", [
    ("no face", "no face found in image 0 (640x480 px) at detection sizes 640, 576, 512, 448, 384, 320"),
    ("missing pack", "insightface model pack 'buffalo_l' not found"),
    ("nested pack", "nested one folder too deep"),
])
def test_errors_surface_through_the_executor(comfy, pack, case, expected):
    name = {"no face": "antelopev2", "missing pack": "buffalo_l", "nested pack": "nestedpack"}[case]
    with pytest.raises(comfy.host.PromptExecutionError) as e:
        comfy.host.run_prompt(_prompt({"img": _black()}, pack_name=name))
    assert expected in str(e.value)
    if case == "missing pack":
        assert "det_10g.onnx and w600k_r50.onnx" in str(e.value) and pack.root in str(e.value)


def test_pack_loads_without_onnxruntime_and_the_loader_says_what_to_install(comfy, pack):
    code = f"""
import sys, os, json
sys.modules["onnxruntime"] = None  # import raises ImportError
sys.path.insert(0, os.path.join({comfy.repo_root!r}, "devtools"))
import comfy_host
comfy_host.bootstrap(os.environ["COMFYUI_PATH"], load_extras=False)
maps = comfy_host.load_pack({comfy.repo_root!r})
import folder_paths
folder_paths.add_model_folder_path("insightface", {pack.root!r})
try:
    maps["PersonalizeFaceAnalysisLoader"]().load("antelopev2", "CPU")
    err = None
except ImportError as e:
    err = str(e)
print(json.dumps({{"nodes": sorted(maps), "error": err}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert {"PersonalizeFaceAnalysisLoader", "PersonalizeFaceEmbed"} <= set(res["nodes"])
    assert res["error"] and "pip install onnxruntime" in res["error"] and "onnxruntime-gpu" in res["error"]
