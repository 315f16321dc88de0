# SPDX-License-Identifier: GPL-3.0-or-later
"""A real ComfyUI server with this pack and tiny models, for the browser tests (and by hand).

    python devtools/browser_host.py --comfyui ../shared/ComfyUI [--port 8199]   # serves until Ctrl+C

Everything the server reads or writes lives in one temporary base directory (``--base-directory``): the pack is a
link in its ``custom_nodes`` beside a small helper pack that registers the tiny model configurations
(``tiny_models.register_tiny_configs``, in the server's process); every model file the example workflows name is a
link, under that very name, to a tiny random model of the same topology (``run_workflow.tiny_substitute``); their
input images are generated. The database is in memory and bytecode goes to ``PYTHONPYCACHEPREFIX``: nothing is
written into the ComfyUI checkout. The server is started and stopped by its PID.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

DEVTOOLS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(DEVTOOLS)
WORKFLOWS = os.path.join(REPO_ROOT, "workflows")
PACK_LINK_NAME = "ComfyUI-Personalize"
HELPER_PACK = "personalize_test_tiny_configs"
# The frontend's settings of the test user (comfyui-frontend-package 1.27 setting ids).
USER_SETTINGS = {"Comfy.TutorialCompleted": True}
log = logging.getLogger("personalize.browser_host")

_HELPER_SOURCE = '''"""Test helper (written by devtools/browser_host.py): registers the tiny model configurations in the server."""
import sys

sys.path.insert(0, {devtools!r})
import tiny_models  # noqa: E402

tiny_models.register_tiny_configs()
NODE_CLASS_MAPPINGS = {{}}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _link(target: str, link: str) -> None:
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not os.path.lexists(link):
        os.symlink(target, link)


def _is_pickle_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in (".bin", ".pt", ".pth", ".ckpt")


def _write_pickle(src: str, dst: str) -> None:
    """The safetensors file ``src`` as a torch pickle at ``dst`` (the public .bin files are pickles)."""
    import torch
    from safetensors.torch import load_file

    if not os.path.exists(dst):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        torch.save(load_file(src), dst)


def workflow_files() -> list[str]:
    return sorted(glob.glob(os.path.join(WORKFLOWS, "*.json")))


def prepare_base(base: str, comfyui: str, cache_dir: str, workflows: list[str] | None = None) -> None:
    """The server's base directory: the pack, the helper pack, the tiny models under the workflows' names, the input
    images. The tiny models are written by this process (ComfyUI imported as a library, CPU)."""
    sys.path.insert(0, DEVTOOLS)
    import comfy_host
    import run_workflow

    comfy_host.bootstrap(comfyui, load_extras=False)  # idempotent

    os.makedirs(os.path.join(base, "custom_nodes"), exist_ok=True)
    _link(REPO_ROOT, os.path.join(base, "custom_nodes", PACK_LINK_NAME))
    helper = os.path.join(base, "custom_nodes", HELPER_PACK)
    os.makedirs(helper, exist_ok=True)
    with open(os.path.join(helper, "__init__.py"), "w") as f:
        f.write(_HELPER_SOURCE.format(devtools=DEVTOOLS))
    settings = os.path.join(base, "user", "default", "comfy.settings.json")
    os.makedirs(os.path.dirname(settings), exist_ok=True)
    with open(settings, "w") as f:  # a returning user: no first-run template browser over the canvas
        json.dump(USER_SETTINGS, f)
    run_workflow.prepare_cache(cache_dir)
    images: dict[str, bool] = {}  # input image -> whether some workflow feeds it to a face node
    for path in workflows if workflows is not None else workflow_files():
        with open(os.path.join(WORKFLOWS, "api", os.path.basename(path))) as f:
            api = json.load(f)
        for _, _, folder, value in run_workflow.model_refs(api):
            sub = run_workflow.tiny_substitute(folder, value, cache_dir)
            if folder == "ipadapter_preset":  # the preset's files under their public names
                for sub_folder, name in run_workflow.preset_files(value, cache_dir):  # written in the names' formats
                    _link(os.path.join(cache_dir, sub_folder, name), os.path.join(base, "models", sub_folder, name))
            elif folder == "insightface":  # a model pack: <root>/models/<name>/
                _link(os.path.join(cache_dir, "insightface", "models", sub), os.path.join(base, "models", "insightface",
                                                                                      "models", value))
            elif _is_pickle_name(value) and not _is_pickle_name(sub):  # a .bin name: the same tensors as a pickle
                _write_pickle(os.path.join(cache_dir, folder, sub), os.path.join(base, "models", folder, value))
            else:
                _link(os.path.join(cache_dir, folder, sub), os.path.join(base, "models", folder, value))
        for node_id, node in api.items():
            image = node["inputs"].get("image")
            if (node["class_type"], "image") in run_workflow._IMAGE_LOADERS and isinstance(image, str):
                face = any(api[n]["class_type"] in run_workflow._FACE_NODES and node_id in run_workflow._sources(api, n)
                           for n in api)
                images[image] = images.get(image, False) or face
    for image, face in images.items():
        run_workflow.write_test_image(os.path.join(base, "input", image), image, face=face)

class Server:
    """``python main.py`` of a ComfyUI checkout on 127.0.0.1 with a prepared base directory; ``stop()`` ends it by its
    PID (and its process group)."""

    def __init__(self, comfyui: str, base: str, port: int | None = None, log_path: str | None = None,
                 python: str = sys.executable):
        self.comfyui, self.base, self.port = os.path.realpath(comfyui), base, port or free_port()
        self.log_path = log_path or os.path.join(base, "server.log")
        self.python, self.proc = python, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> Server:
        env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(self.base, "pycache"), PYTHONUNBUFFERED="1")
        cmd = [self.python, os.path.join(self.comfyui, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port",
               str(self.port), "--base-directory", self.base, "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.base, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/object_info/PersonalizeIPAdapterLoader", timeout=5) as r:
                    if r.status == 200 and json.load(r):
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the ComfyUI server did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=20)
        finally:
            self._log.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(REPO_ROOT, "..", "shared", "ComfyUI"))
    ap.add_argument("--port", type=int, default=8199)
    ap.add_argument("--cache-dir", default=os.path.join(REPO_ROOT, ".tiny_models"))
    ap.add_argument("--prepare-only", metavar="BASE", help="only write the base directory BASE, then exit")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    if args.prepare_only:
        prepare_base(os.path.abspath(args.prepare_only), args.comfyui, args.cache_dir)
        return
    base = tempfile.mkdtemp(prefix="personalize_server_")
    prepare_base(base, args.comfyui, args.cache_dir)
    server = Server(args.comfyui, base, args.port).start()
    log.info("serving %s (base directory %s); Ctrl+C stops it", server.url, base)
    try:
        while server.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
