# SPDX-License-Identifier: GPL-3.0-or-later
"""Tier-2 fixtures: a real, headless ComfyUI (CPU) with tiny random models.

The tests here need a ComfyUI checkout named by the ``COMFYUI_PATH``
environment variable (``.ci/run`` sets it to ``../shared/ComfyUI`` when that
exists); without it every test using the ``comfy`` fixture is skipped, with
the reason.  ``devtools/`` is on ``sys.path`` (``tests/conftest.py``).  The
checkout is only read: the session fails if a test wrote into it.
"""

import os
import time
import types

import pytest

SKIP_REASON = "no ComfyUI: set COMFYUI_PATH (bash .ci/run uses ../shared/ComfyUI when it exists); tier-2 tests skipped"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """Bootstrapped ComfyUI + tiny models in a session models dir.

    Yields a namespace with ``host`` (the ``comfy_host`` module), ``tiny``
    (``tiny_models``), ``models_dir`` and ``files`` ({key: path} of the tiny
    files, keys of ``tiny_models.TINY_FILES``), ``repo_root``, ``load_pack()``
    (the pack through ComfyUI's own loader: its NODE_CLASS_MAPPINGS) and
    ``module(name)`` (a module of the loaded pack, e.g. ``"nodes.comfy.sites"``).
    """
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(SKIP_REASON)
    started = time.time()
    import comfy_host
    import tiny_models

    comfy_host.bootstrap(path, output_dir=str(tmp_path_factory.mktemp("comfy_output")),
                         input_dir=str(tmp_path_factory.mktemp("comfy_input")))
    tiny_models.register_tiny_configs()
    models_dir = tmp_path_factory.mktemp("tiny_models")
    files = tiny_models.write_tiny_set(str(models_dir), seed=0)
    comfy_host.use_models_dir(str(models_dir))
    yield types.SimpleNamespace(host=comfy_host, tiny=tiny_models, models_dir=str(models_dir), files=files,
                                repo_root=REPO_ROOT, load_pack=lambda: comfy_host.load_pack(REPO_ROOT),
                                module=lambda name: comfy_host.pack_module(REPO_ROOT, name))
    written = files_written_since(path, started)
    assert not written, f"tests wrote into the ComfyUI tree {path} (use temporary folders): {written[:5]}"


def files_written_since(root: str, since: float) -> list[str]:
    """Files under ``root`` modified after ``since`` (bytecode caches aside: Python writes those, not the tests;
    ``.ci/run`` sends them to the venv)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for f in filenames:
            p = os.path.join(dirpath, f)
            try:
                if os.stat(p).st_mtime >= since:
                    out.append(p)
            except OSError:
                pass
    return out
