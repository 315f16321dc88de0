# SPDX-License-Identifier: GPL-3.0-or-later
"""Tier-2 fixtures: a real, headless ComfyUI (CPU) with tiny random models.

The tests here need a ComfyUI checkout named by the ``COMFYUI_PATH``
environment variable; without it every test using the ``comfy`` fixture is
skipped.  ``devtools/`` is expected on ``sys.path`` (``tests/conftest.py``
puts it there); as a fallback this file adds it itself.
"""

import importlib.util
import os
import sys
import types

import pytest

SKIP_REASON = "COMFYUI_PATH not set: tier-2 ComfyUI tests skipped"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if importlib.util.find_spec("comfy_host") is None:  # tests/conftest.py not present (yet)
    sys.path.insert(0, os.path.join(REPO_ROOT, "devtools"))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """Bootstrapped ComfyUI + tiny models in a session models dir.

    Yields a namespace with ``host`` (the ``comfy_host`` module), ``tiny``
    (``tiny_models``), ``models_dir`` and ``files`` ({key: path} of the tiny
    files, keys of ``tiny_models.TINY_FILES``), ``repo_root``.
    """
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        pytest.skip(SKIP_REASON)
    import comfy_host
    import tiny_models

    comfy_host.bootstrap(path, output_dir=str(tmp_path_factory.mktemp("comfy_output")))
    tiny_models.register_tiny_configs()
    models_dir = tmp_path_factory.mktemp("tiny_models")
    files = tiny_models.write_tiny_set(str(models_dir), seed=0)
    comfy_host.use_models_dir(str(models_dir))
    return types.SimpleNamespace(host=comfy_host, tiny=tiny_models, models_dir=str(models_dir), files=files,
                                 repo_root=REPO_ROOT)
