# SPDX-License-Identifier: GPL-3.0-or-later
"""Browser tier: the pack as a user meets it in the real ComfyUI frontend.

A real ComfyUI server (``devtools/browser_host.py``: the pack, tiny models under the names the workflows use, an
in-memory database, nothing written into the checkout) and the frontend ComfyUI pins (comfyui-frontend-package),
driven in Debian's headless Chromium through Playwright (the system browser, never a downloaded one). Every example
workflow is loaded with ``app.loadGraphData`` and checked as the frontend sees it; the inference workflows are
queued and must complete. Without Chromium, Playwright, the frontend package or COMFYUI_PATH the tier is skipped
with the reason.
"""
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKFLOWS = os.path.join(ROOT, "workflows")
NAMES = sorted(os.path.splitext(f)[0] for f in os.listdir(WORKFLOWS) if f.endswith(".json"))
CHROMIUM = os.environ.get("PERSONALIZE_CHROMIUM", "/usr/bin/chromium")
# Flags for a headless Chromium on a machine without internet (no background connections, no sandbox as root).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}
# Workflows that train (minutes even on tiny models at their real step counts): loaded and checked, not queued.
TRAINING = {"train_lora_sd15_sude_palp", "e4t_tune_sd15"}
QUEUE_TIMEOUT_S = 240
PACK = "ComfyUI-Personalize"  # the pack's folder name in the server's custom_nodes (browser_host.PACK_LINK_NAME)


def _skip_reason() -> str | None:
    if not os.environ.get("COMFYUI_PATH"):
        return "no ComfyUI: set COMFYUI_PATH (bash .ci/run uses ../shared/ComfyUI); browser tier skipped"
    if not os.path.isfile(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; bash .ci/run installs it); browser tier skipped"
    for module, what in (("playwright", "playwright"), ("comfyui_frontend_package", "comfyui-frontend-package")):
        try:
            __import__(module)
        except ImportError:
            return f"{what} is not installed (bash .ci/run installs it); browser tier skipped"
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    sys.path.insert(0, os.path.join(ROOT, "devtools"))
    import browser_host

    base = str(tmp_path_factory.mktemp("comfy_server"))
    comfyui = os.environ["COMFYUI_PATH"]
    # the tiny models are written by a separate process: this one may host the in-process tier-2 ComfyUI
    subprocess.run([sys.executable, os.path.join(ROOT, "devtools", "browser_host.py"), "--comfyui", comfyui,
                    "--cache-dir", str(tmp_path_factory.mktemp("tiny_cache")), "--prepare-only", base],
                   check=True, env=dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(base, "pycache")))
    started = time.time()
    srv = browser_host.Server(comfyui, base).start()
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(os.path.join(base, "pycache"), ignore_errors=True)
    written = [os.path.join(d, f) for d, dirs, files in os.walk(comfyui) for f in files
               if os.lstat(os.path.join(d, f)).st_mtime >= started]
    assert not written, f"the server wrote into the ComfyUI tree {comfyui}: {written[:5]}"


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport=VIEWPORT)
        pg.errors = []
        pg.on("pageerror", lambda e: pg.errors.append(f"{e.message}\n{e.stack}"))
        pg.goto(server.url)
        pg.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
        yield pg
        browser.close()


def load(name, api=False):
    with open(os.path.join(WORKFLOWS, "api" if api else "", name + ".json")) as f:
        return json.load(f)


def load_in_frontend(page, workflow):
    page.evaluate("async (wf) => { await window.app.loadGraphData(structuredClone(wf)); }", workflow)
    page.wait_for_timeout(300)


def without_meta(prompt):
    return {k: {kk: vv for kk, vv in v.items() if kk != "_meta"} for k, v in prompt.items()}


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_unchanged_and_converts_to_its_api_form(page, name):
    ui = load(name)
    load_in_frontend(page, ui)
    state = page.evaluate("""() => {
        const reg = LiteGraph.registered_node_types;
        const g = window.app.graph;
        return {missing: g._nodes.filter(n => !reg[n.type]).map(n => n.type),
                serialized: window.app.graph.serialize().nodes.map(n => [n.id, n.type, n.widgets_values ?? null])};
    }""")
    assert state["missing"] == [], f"the frontend does not know {state['missing']}"
    after = {nid: (typ, values) for nid, typ, values in state["serialized"]}
    for node in ui["nodes"]:
        typ, values = after[node["id"]]
        assert typ == node["type"]
        assert values == node.get("widgets_values"), f"node {node['id']} ({typ}): the frontend changed its widgets"
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    api = load(name, api=True)
    assert without_meta(prompt) == without_meta(api)
    for nid, node in api.items():  # the titles that say what a node is for
        if "_meta" in node:
            assert prompt[nid]["_meta"]["title"] == node["_meta"]["title"]


@pytest.mark.parametrize("name", NAMES)
def test_layout_has_no_overlaps_and_the_result_in_view(page, name):
    load_in_frontend(page, load(name))
    page.wait_for_timeout(1500)  # Load Image grows when its picture arrives
    geo = page.evaluate("""() => {
        const app = window.app, ds = app.canvas.ds, el = app.canvas.canvas, th = LiteGraph.NODE_TITLE_HEIGHT;
        const nodes = app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
            rect: [n.pos[0], n.pos[1] - th, n.size[0], n.size[1] + th],
            output: !!n.constructor.nodeData?.output_node}));
        return {nodes, scale: ds.scale, offset: [...ds.offset], view: [el.clientWidth, el.clientHeight]};
    }""")
    shots = os.environ.get("PERSONALIZE_SCREENSHOTS")  # =workflows: the template browser's thumbnails, the README's pictures
    if shots:
        os.makedirs(shots, exist_ok=True)
        page.screenshot(path=os.path.join(shots, name + ".jpg"), type="jpeg", quality=70)
    nodes = geo["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["rect"], b["rect"]
            overlap = ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah
            assert not overlap, f"{a['title']} (#{a['id']}) {a['rect']} overlaps {b['title']} (#{b['id']}) {b['rect']}"
    scale, (ox, oy), (vw, vh) = geo["scale"], geo["offset"], geo["view"]
    outputs = [n for n in nodes if n["output"] and n["type"] == "SaveImage"] or [n for n in nodes if n["output"]]
    for n in outputs:
        x, y, w, h = n["rect"]
        left, top, right, bottom = (x + ox) * scale, (y + oy) * scale, (x + w + ox) * scale, (y + h + oy) * scale
        assert 0 <= left and 0 <= top and right <= vw and bottom <= vh, \
            f"{n['title']} (#{n['id']}) is at {[left, top, right, bottom]} on a {vw}x{vh} canvas: out of the default view"

def test_the_frontend_keeps_a_learning_rate_of_1e_6(page):
    """The number widget's own rounding (ComfyUI's frontend rounds to ``round``, else to ``step``): SuDe's reference
    learning rate 1e-6 must survive the widget as typed."""
    load_in_frontend(page, load("train_lora_sd15_sude_palp"))
    got = page.evaluate("""() => {
        const node = window.app.graph._nodes.find(n => n.type === 'PersonalizeLoRATrainer');
        const out = {};
        for (const name of ['learning_rate', 'token_learning_rate']) {
            const w = node.widgets.find(w => w.name === name);
            for (const v of [0.000001, 0.000015, 0.0003]) {
                w.setValue(v, {node, canvas: window.app.canvas});
                out[`${name}=${v}`] = w.value;
            }
        }
        return out;
    }""")
    for key, value in got.items():
        typed = float(key.split("=")[1])
        assert value == pytest.approx(typed, rel=1e-9), f"{key}: the widget made it {value}"


@pytest.mark.parametrize("name", [n for n in NAMES if n not in TRAINING])
def test_inference_workflow_queued_from_the_frontend_completes(page, server, name):
    page.errors.clear()
    load_in_frontend(page, load(name))
    page.evaluate("""() => {  // tiny models: a small latent and two steps check the graph as well
        for (const n of window.app.graph._nodes) {
            for (const w of n.widgets ?? []) {
                if (['width', 'height'].includes(w.name) && n.type.includes('Latent')) w.value = 128;
                if (w.name === 'steps' && n.type.includes('Sampler')) w.value = 2;
            }
        }
    }""")
    before = set(server.get("/history"))
    page.evaluate("async () => await window.app.queuePrompt(0, 1)")
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    entry = None
    while time.monotonic() < deadline:
        new = [v for k, v in server.get("/history").items() if k not in before]
        if new and new[0].get("status", {}).get("completed") is not None:
            entry = new[0]
            break
        time.sleep(1)
    assert entry is not None, f"{name} did not finish in {QUEUE_TIMEOUT_S} s:\n{server.log_tail()}"
    status = entry["status"]
    assert status["status_str"] == "success", f"{name}: {status}\n{server.log_tail()}"
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert images, f"{name} produced no image"
    assert page.errors == [], page.errors


def test_every_template_has_a_thumbnail(server):
    """The frontend's template browser lists the pack's workflows/ and shows <name>.jpg beside each."""
    import urllib.request

    templates = server.get("/workflow_templates")
    ours = sorted(templates.get(PACK, []))
    assert ours == NAMES
    for name in ours:
        with urllib.request.urlopen(f"{server.url}/api/workflow_templates/{PACK}/{name}.jpg", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"] == "image/jpeg" and len(r.read()) > 10_000
