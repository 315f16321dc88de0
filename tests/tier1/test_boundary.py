"""The import rule of the pack, read from the sources (AST), so a stray import fails here before it lands:

- ``models/`` and ``training/`` are plain torch: no ComfyUI module (``comfy``, ``folder_paths``, ...), and no
  relative import out of ``models/`` / ``training/`` (they never depend on the nodes);
- ``nodes/comfy/`` (the glue) is the only place that imports ComfyUI internals;
- node modules (``nodes/*.py``) may use ``folder_paths``, ComfyUI's progress bar and its interrupt check, nothing else;
- the pack's ``__init__.py`` imports no ComfyUI module (it must import outside ComfyUI too).
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Top-level modules and packages of a ComfyUI checkout (0.3.x: the .py files and packages at its root).
COMFY_MODULES = frozenset({
    "comfy", "comfy_extras", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "folder_paths",
    "nodes", "execution", "server", "latent_preview", "node_helpers", "main", "cuda_malloc", "comfyui_version",
    "protocol", "new_updater", "hook_breaker_ac10a0", "app", "api_server", "middleware", "utils", "alembic_db",
})
# What node modules may take from ComfyUI: (module, name); name None = the whole module.
NODE_ALLOWED = frozenset({
    ("folder_paths", None),
    ("comfy.utils", "ProgressBar"),
    ("comfy.model_management", "throw_exception_if_processing_interrupted"),
    ("comfy.model_management", "InterruptProcessingException"),
})
GLUE = os.path.join("nodes", "comfy")


def imports(source: str, path: str):
    """(absolute module, imported name or None, line) for every import in ``source``, relative imports resolved
    against ``path`` (relative to the pack root, e.g. ``models/ipadapter.py``); string-literal dynamic imports
    (``importlib.import_module("x")``, ``__import__("x")``) count too."""
    folder = os.path.dirname(path.replace(os.sep, "/"))
    package = folder.split("/") if folder else []  # a module's package is its folder (also for an __init__.py)
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                module = ".".join(["<pack>", *base, *(node.module.split(".") if node.module else [])])
            else:
                module = node.module
            for alias in node.names:
                yield module, alias.name, node.lineno
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                yield node.args[0].value, None, node.lineno


def is_comfy(module: str) -> bool:
    return module.split(".")[0] in COMFY_MODULES


def violations(source: str, path: str) -> list[str]:
    """What breaks the rule in one file of the pack (``path`` relative to the pack root)."""
    path = path.replace(os.sep, "/")
    top = path.split("/")[0]
    out = []
    for module, name, line in imports(source, path):
        where = f"{path}:{line}: {module}" + (f".{name}" if name else "")
        if module.startswith("<pack>."):
            target = module.split(".")[1]
            if top in ("models", "training") and target not in ("models", "training"):
                out.append(f"{where}: models/ and training/ do not import from the {target}/ layer")
            continue
        if not is_comfy(module):
            continue
        if top in ("models", "training"):
            out.append(f"{where}: models/ and training/ are plain torch: no ComfyUI import")
        elif path.startswith(GLUE.replace(os.sep, "/") + "/"):
            continue
        elif top == "nodes":
            if (module, None) not in NODE_ALLOWED and (module, name) not in NODE_ALLOWED:
                out.append(f"{where}: node modules may use folder_paths, ProgressBar and the interrupt check only; "
                           "put ComfyUI internals in nodes/comfy/")
        elif path == "__init__.py":
            out.append(f"{where}: the pack's __init__ must import outside ComfyUI")
    return out


def pack_sources():
    for folder in ("models", "training", "nodes"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(dirpath, f), ROOT)
    yield "__init__.py"


def test_the_pack_keeps_the_import_rule():
    found = []
    files = list(pack_sources())
    assert any(f.startswith(GLUE) for f in files) and any(f.startswith("models") for f in files)
    for rel in files:
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            found += violations(f.read(), rel)
    assert not found, "\n".join(found)


def test_the_glue_is_where_comfy_is_imported():
    """The rule is not vacuous: the glue does import ComfyUI internals, the node modules only what is allowed."""
    glue, nodes = set(), set()
    for rel in pack_sources():
        with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
            mods = {m for m, _, _ in imports(f.read(), rel) if is_comfy(m)}
        (glue if rel.startswith(GLUE) else nodes if rel.startswith("nodes") else set()).update(mods)
    assert {"comfy.model_management", "comfy.model_patcher", "comfy.ldm.modules.attention"} <= glue
    assert nodes <= {m for m, _ in NODE_ALLOWED}


@pytest.mark.parametrize("path, source, expected", [
    ("models/ipadapter.py", "import comfy.model_management as mm\n", "no ComfyUI import"),
    ("training/trainer.py", "def f():\n    import folder_paths\n", "no ComfyUI import"),
    ("training/run.py", "from comfy.utils import ProgressBar\n", "no ComfyUI import"),
    ("models/face/runtime.py", "import importlib\nimportlib.import_module('comfy.sd')\n", "no ComfyUI import"),
    ("models/ipadapter.py", "from ..nodes.comfy import sites\n", "do not import from the nodes/ layer"),
    ("nodes/train.py", "import comfy.model_management as mm\n", "nodes/comfy/"),
    ("nodes/ipadapter.py", "from comfy.sd import load_lora_for_models\n", "nodes/comfy/"),
    ("__init__.py", "import folder_paths\n", "outside ComfyUI"),
])
def test_a_stray_import_is_caught(path, source, expected):
    found = violations(source, path)
    assert len(found) == 1 and expected in found[0], found


@pytest.mark.parametrize("path, source", [
    ("nodes/comfy/weights.py", "import comfy.sd\nimport comfy.model_patcher\n"),
    ("nodes/train.py", "from comfy.utils import ProgressBar\nimport folder_paths\n"),
    ("models/face/analysis.py", "from .image import norm_crop\nfrom ..checkpoints import load_file\n"),
    ("training/export.py", "from ..models.checkpoints import atomic_save_safetensors\n"),
])
def test_allowed_imports_pass(path, source):
    assert violations(source, path) == []
