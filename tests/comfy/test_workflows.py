"""Tier 2: the example workflows are valid for the real node definitions and run headless through ComfyUI's
executor with tiny models (the README's run command, in-process)."""
import glob
import json
import os

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UI_FILES = sorted(glob.glob(os.path.join(ROOT, "workflows", "*.json")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in UI_FILES]


def load(name, api=False):
    with open(os.path.join(ROOT, "workflows", "api" if api else "", name + ".json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runner(comfy):
    comfy.host.load_pack(comfy.repo_root)
    import run_workflow
    return run_workflow


def test_every_workflow_has_both_forms():
    assert len(NAMES) >= 3
    for name in NAMES:
        assert os.path.isfile(os.path.join(ROOT, "workflows", "api", name + ".json"))


@pytest.mark.parametrize("name", NAMES)
def test_workflow_matches_node_definitions(comfy, runner, name):
    ui = load(name)
    comfy.host.check_ui_workflow(ui)  # node types, input names, widget counts and types
    assert comfy.host.ui_to_api(ui) == load(name, api=True)
    assert any(n["type"].startswith("Personalize") for n in ui["nodes"])


def run(runner, tmp_path, workflow_path, tag):
    out = tmp_path / f"{tag}.png"
    runner.main(["--workflow", str(workflow_path), "--out", str(out), "--tiny", "--steps", "2", "--size", "64",
                 "--cache-dir", str(tmp_path.parent / "tiny_cache")])
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_headless(runner, tmp_path, name):
    img = run(runner, tmp_path, os.path.join(ROOT, "workflows", name + ".json"), "ui")
    assert img.shape == (64, 64, 3) and img.std() > 0


def test_ipadapter_changes_the_image_and_is_deterministic(runner, tmp_path):
    api = load("ipadapter_sd15_basic", api=True)
    a = run(runner, tmp_path, os.path.join(ROOT, "workflows", "api", "ipadapter_sd15_basic.json"), "a")
    b = run(runner, tmp_path, os.path.join(ROOT, "workflows", "api", "ipadapter_sd15_basic.json"), "b")
    assert np.array_equal(a, b)
    node = next(k for k, v in api.items() if v["class_type"] == "PersonalizeIPAdapterApply")
    api[node]["inputs"]["weight"] = 0.0
    path = tmp_path / "weight0.json"
    path.write_text(json.dumps(api))
    c = run(runner, tmp_path, path, "c")
    assert np.abs(a - c).max() > 0


def test_training_example_names_the_subject_through_the_trainer_output(comfy, runner):
    """The sampling prompt takes the trainer's 'subject' output (embedding:<save_name> with a trained token), so a
    renamed save_name reaches the prompt; no prompt hard-codes an embedding name."""
    api = load("train_lora_sd15_sude_palp", api=True)
    trainer = next(nid for nid, n in api.items() if n["class_type"] == "PersonalizeLoRATrainer")
    cls = comfy.load_pack()["PersonalizeLoRATrainer"]
    subject_slot = list(cls.RETURN_NAMES).index("subject")
    encoders = [n for n in api.values() if n["class_type"] == "CLIPTextEncode"]
    assert not any("embedding:" in str(n["inputs"]["text"]) for n in encoders)
    positive = api[api[next(n for n, v in api.items() if v["class_type"] == "KSampler")]["inputs"]["positive"][0]]
    source = api[positive["inputs"]["text"][0]]
    assert source["class_type"] == "StringReplace" and source["inputs"]["replace"] == [trainer, subject_slot]
    assert source["inputs"]["find"] in source["inputs"]["string"]


@pytest.mark.parametrize("name", NAMES)
def test_workflow_says_which_files_it_needs_and_where_to_get_them(comfy, runner, name):
    """A note lists every model file / folder the graph names; each loader of a file with a known public source
    carries it for the frontend's missing-models dialog (properties.models: name, url, directory)."""
    import make_workflows

    ui, api = load(name), load(name, api=True)
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1
    text = notes[0]["widgets_values"][0]
    by_id = {str(n["id"]): n for n in ui["nodes"]}
    for node_id, _, folder, value in runner.model_refs(api):
        if folder == "ipadapter_preset":  # the unified loader: the preset's public files, per model kind
            from comfyui_personalize.models.presets import PRESETS

            assert f"preset '{value}'" in text and all(n in text for ns in PRESETS[value].names.values() for n in ns)
            continue
        assert f"{folder}/" in text and value in text, f"the note does not list {folder}/{value}"
        url = make_workflows.MODEL_SOURCES.get(value)
        if url is not None:
            assert url.startswith(("https://huggingface.co/", "https://github.com/")) and url in text
            entry = {"name": value, "url": url, "directory": folder}
            assert entry in by_id[node_id]["properties"].get("models", []), f"node {node_id} has no download link"
