# SPDX-License-Identifier: GPL-3.0-or-later
"""A real ComfyUI, headless, as a library (for tests and the workflow runner).

Typical use::

    import comfy_host
    comfy_host.bootstrap(os.environ["COMFYUI_PATH"])      # CPU, no server
    comfy_host.use_models_dir("/some/models")              # extra model folders
    mappings = comfy_host.load_pack(repo_root)              # via ComfyUI's own loader
    result = comfy_host.run_prompt(api_prompt)              # validate + execute
    paths = comfy_host.output_image_paths(result)

and ``ui_to_api`` / ``check_ui_workflow`` for workflows saved by the frontend.

Nothing here starts a web server.  ``bootstrap`` imports ComfyUI the way its
``main.py`` does (``comfy.cli_args`` first with ``cpu = True``, then
``utils.extra_config``, then ``nodes``), loads the built-in ``comfy_extras``
nodes, and points ComfyUI's output/temp folders at a temporary directory so
nothing is written into the ComfyUI checkout.  The pack's repository root is
never put on ``sys.path``: the pack has a ``nodes`` package that must not
shadow ComfyUI's ``nodes.py``.
"""

import asyncio
import atexit
import contextlib
import importlib
import logging
import os
import shutil
import sys
import tempfile
import uuid

log = logging.getLogger(__name__)

#: Folder names ``use_models_dir`` always registers.
DEFAULT_MODEL_FOLDERS = ("checkpoints", "clip_vision", "loras", "vae", "embeddings", "ipadapter")

#: Name under which the pack is linked into the temporary custom_nodes dir.
PACK_DIR_NAME = "ComfyUI-Personalize"

_state = {
    "comfyui_path": None,   # realpath of the bootstrapped checkout
    "work_dir": None,       # temp dir holding output/temp (and custom_nodes)
    "packs": {},            # realpath(repo_root) -> NODE_CLASS_MAPPINGS
    "pack_modules": {},     # realpath(repo_root) -> the name ComfyUI's loader imported the pack under
    "extras_failed": [],    # comfy_extras files that did not import
}


class ComfyHostError(RuntimeError):
    """Base class of the errors raised by this module."""


class PackLoadError(ComfyHostError):
    """ComfyUI's custom-node loader could not load the pack."""


class PromptValidationError(ComfyHostError):
    """``execution.validate_prompt`` rejected the prompt; ``.error`` / ``.node_errors`` hold ComfyUI's report."""

    def __init__(self, message, error=None, node_errors=None):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors or {}


class PromptExecutionError(ComfyHostError):
    """A node raised during execution; ``.details`` is ComfyUI's ``execution_error`` message."""

    def __init__(self, message, details=None):
        super().__init__(message)
        self.details = details or {}


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def _capture_logs(level=logging.WARNING, quiet=False):
    """Collect root-logger records (ComfyUI logs through the root logger).

    With ``quiet`` the records are only collected, not shown (used while
    loading ``comfy_extras``, whose optional-dependency warnings are noise).
    """
    records = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    root = logging.getLogger()
    handler = _Collect(level)
    saved_level = root.level
    saved_handlers = None
    if quiet:
        saved_handlers = root.handlers[:]
        root.handlers = []
    root.addHandler(handler)
    if root.level > level:  # make sure the records we want are emitted at all
        root.setLevel(level)
    try:
        yield records
    finally:
        root.removeHandler(handler)
        root.setLevel(saved_level)
        if saved_handlers is not None:
            root.handlers = saved_handlers


def _run_async(coro):
    """Run a coroutine to completion (ComfyUI 0.3.6x made several loaders async)."""
    return asyncio.run(coro)


def _maybe_await(value):
    if asyncio.iscoroutine(value):
        return _run_async(value)
    return value


def bootstrap(comfyui_path, output_dir=None, load_extras=True, input_dir=None):
    """Import ComfyUI from ``comfyui_path`` as a CPU-only library (idempotent).

    * puts the checkout at the front of ``sys.path`` (never the pack's root);
    * sets ``comfy.cli_args.args.cpu = True`` before any other comfy import;
    * imports ``utils.extra_config`` first (as ``main.py``), then ``nodes`` and
      ``execution``, and (``load_extras``) the built-in ``comfy_extras`` nodes;
    * sets ComfyUI's output and temp directories to ``output_dir`` (default: a
      fresh temporary directory removed at exit), and its input directory to
      ``input_dir`` when given (tests: so that nothing is written into the
      checkout's ``input/``).

    Returns the ``nodes`` module.  Calling it again with the same checkout is a
    no-op; a different checkout in the same process raises.
    """
    real = os.path.realpath(os.fspath(comfyui_path))
    if _state["comfyui_path"] is not None:
        if _state["comfyui_path"] != real:
            raise ComfyHostError("ComfyUI already bootstrapped from {} (asked for {})".format(
                _state["comfyui_path"], real))
        if output_dir is not None:
            _set_output_dirs(output_dir)
        if input_dir is not None:
            _set_input_dir(input_dir)
        return sys.modules["nodes"]

    if not os.path.isfile(os.path.join(real, "nodes.py")) or not os.path.isdir(os.path.join(real, "comfy")):
        raise ComfyHostError(f"{real} does not look like a ComfyUI checkout (no nodes.py / comfy/)")

    # A module called "nodes" imported from elsewhere (e.g. the pack's own
    # nodes/ package) would make ComfyUI import the wrong thing.
    existing = sys.modules.get("nodes")
    if existing is not None and not _is_inside(getattr(existing, "__file__", None) or "", real):
        raise ComfyHostError("a foreign 'nodes' module is already imported ({}); ComfyUI's nodes.py would be "
                             "shadowed".format(getattr(existing, "__file__", existing)))

    if real in sys.path:
        sys.path.remove(real)
    sys.path.insert(0, real)

    from comfy.cli_args import args  # must come before any other comfy import
    args.cpu = True

    # in main.py's order (utils.extra_config first), not sorted
    import utils.extra_config  # noqa: F401, I001
    import folder_paths
    import nodes
    import execution  # noqa: F401

    if not _is_inside(nodes.__file__, real):
        raise ComfyHostError(f"imported 'nodes' from {nodes.__file__} instead of the ComfyUI checkout {real}")

    _state["comfyui_path"] = real
    work = tempfile.mkdtemp(prefix="personalize_comfy_host_")
    _state["work_dir"] = work
    atexit.register(shutil.rmtree, work, True)
    _set_output_dirs(output_dir or os.path.join(work, "output"))
    folder_paths.set_temp_directory(os.path.join(work, "temp"))
    if input_dir is not None:
        _set_input_dir(input_dir)

    if load_extras:
        with _capture_logs(logging.WARNING, quiet=True):
            _run_async(nodes.init_public_apis())
            failed = _run_async(nodes.init_builtin_extra_nodes())
        _state["extras_failed"] = list(failed or [])
        if failed:
            log.info("comfy_extras files that did not import (missing optional deps): %s", ", ".join(failed))
    log.info("ComfyUI bootstrapped from %s (%d node types)", real, len(nodes.NODE_CLASS_MAPPINGS))
    return nodes


def _set_output_dirs(output_dir):
    import folder_paths
    output_dir = os.path.abspath(os.fspath(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    folder_paths.set_output_directory(output_dir)


def _set_input_dir(input_dir):
    import folder_paths
    input_dir = os.path.abspath(os.fspath(input_dir))
    os.makedirs(input_dir, exist_ok=True)
    folder_paths.set_input_directory(input_dir)


def _is_inside(path, root):
    try:
        return os.path.commonpath([os.path.realpath(path), root]) == root
    except ValueError:
        return False


def _require_bootstrap():
    if _state["comfyui_path"] is None:
        raise ComfyHostError("call comfy_host.bootstrap(comfyui_path) first")


def comfyui_path():
    """The realpath of the bootstrapped ComfyUI checkout (None before ``bootstrap``)."""
    return _state["comfyui_path"]


# ---------------------------------------------------------------------------
# Model folders
# ---------------------------------------------------------------------------

def use_models_dir(models_dir, folder_names=()):
    """Make ComfyUI look first in ``models_dir/<name>`` for each model folder.

    Registers ``DEFAULT_MODEL_FOLDERS`` plus ``folder_names`` with
    ``folder_paths.add_model_folder_path(..., is_default=True)``: the new path
    goes first and existing entries (ComfyUI's own folders, extra_model_paths)
    are kept.  Folder names ComfyUI does not know yet (e.g. ``ipadapter``) are
    created with ComfyUI's usual model-file extensions.  Idempotent.
    """
    _require_bootstrap()
    import folder_paths
    models_dir = os.path.abspath(os.fspath(models_dir))
    names = list(DEFAULT_MODEL_FOLDERS) + [n for n in folder_names if n not in DEFAULT_MODEL_FOLDERS]
    for name in names:
        path = os.path.join(models_dir, name)
        known = folder_paths.map_legacy(name) in folder_paths.folder_names_and_paths
        folder_paths.add_model_folder_path(name, path, is_default=True)
        if not known:
            paths, _ = folder_paths.folder_names_and_paths[folder_paths.map_legacy(name)]
            folder_paths.folder_names_and_paths[folder_paths.map_legacy(name)] = (
                paths, set(folder_paths.supported_pt_extensions))
        folder_paths.filename_list_cache.pop(folder_paths.map_legacy(name), None)
    return models_dir


# ---------------------------------------------------------------------------
# Loading the pack through ComfyUI's own loader
# ---------------------------------------------------------------------------

def load_pack(repo_root, dir_name=PACK_DIR_NAME):
    """Load a custom-node pack with ComfyUI's ``nodes.load_custom_node``.

    A temporary ``custom_nodes`` dir gets a symlink ``dir_name`` -> ``repo_root``
    and ComfyUI loads it exactly as at startup (node ids already registered by
    ComfyUI are ignored, as in ``init_external_custom_nodes``).  Returns the
    pack's ``NODE_CLASS_MAPPINGS`` (for a V3 pack: the node classes it
    registered).  Raises ``PackLoadError`` with ComfyUI's logged reason if
    the load fails.  Loading the same root again returns the cached mapping.
    """
    _require_bootstrap()
    import nodes
    root = os.path.realpath(os.fspath(repo_root))
    if root in _state["packs"]:
        return _state["packs"][root]
    if not os.path.isfile(os.path.join(root, "__init__.py")):
        raise PackLoadError(f"{root} has no __init__.py")

    # A fresh custom_nodes dir per attempt: a failed load can be retried.
    custom_nodes = tempfile.mkdtemp(prefix="custom_nodes_", dir=_state["work_dir"])
    link = os.path.join(custom_nodes, dir_name)
    os.symlink(root, link, target_is_directory=True)

    before = dict(nodes.NODE_CLASS_MAPPINGS)
    with _capture_logs(logging.WARNING) as records:
        ok = _maybe_await(nodes.load_custom_node(link, ignore=set(before), module_parent="custom_nodes"))
    if not ok:
        reasons = "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
        raise PackLoadError("ComfyUI could not load the pack at {}:\n{}".format(root, reasons or "(no reason logged)"))

    module = sys.modules.get(link.replace(".", "_x_"))
    mappings = getattr(module, "NODE_CLASS_MAPPINGS", None)
    if mappings is None:  # V3 pack: take what it registered
        mappings = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v}
    shadowed = [k for k in mappings if k in before]
    if shadowed:
        log.warning("pack node ids already defined by ComfyUI, ignored by the loader: %s", shadowed)
    _state["packs"][root] = mappings
    if module is not None:
        _state["pack_modules"][root] = module.__name__
    log.info("loaded pack %s: %d node types", root, len(mappings))
    return mappings


def pack_module(repo_root, name):
    """A module of a pack loaded by :func:`load_pack`, as ComfyUI's loader imported it: ``name`` is relative to the
    pack (``"nodes.comfy.sites"``, ``"models.ipadapter"``)."""
    root = os.path.realpath(os.fspath(repo_root))
    if root not in _state["pack_modules"]:
        raise ComfyHostError(f"the pack at {root} is not loaded (call load_pack first)")
    full = "{}.{}".format(_state["pack_modules"][root], name)
    if full not in sys.modules:
        importlib.import_module(full)
    return sys.modules[full]


# ---------------------------------------------------------------------------
# Running prompts
# ---------------------------------------------------------------------------

class StubServer:
    """The few ``PromptServer`` attributes ``execution.PromptExecutor`` uses; records the events."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events = []

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))

    def queue_updated(self):
        pass


def _format_node_errors(node_errors):
    lines = []
    for node_id, info in node_errors.items():
        for err in info.get("errors", []):
            lines.append("  node {} ({}): {}: {}".format(node_id, info.get("class_type"), err.get("message"),
                                                       err.get("details")))
    return "\n".join(lines)


def validate(api_prompt):
    """Run ``execution.validate_prompt``; raise ``PromptValidationError`` if anything is invalid.

    Returns the list of output node ids to execute.
    """
    _require_bootstrap()
    import execution
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = _maybe_await(execution.validate_prompt(prompt_id, api_prompt, None))
    if not valid or node_errors:
        msg = "invalid prompt"
        if error:
            msg += ": {}".format(error.get("message"))
            if error.get("details"):
                msg += "\n" + str(error.get("details"))
        if node_errors:
            msg += "\n" + _format_node_errors(node_errors)
        raise PromptValidationError(msg, error=error, node_errors=node_errors)
    return outputs


def run_prompt(api_prompt, extra_data=None, executor=None):
    """Validate and execute an API-format prompt headless; return ComfyUI's history entry.

    Returns ``{"prompt_id", "outputs": {node_id: ui_output}, "meta": {...},
    "events": [(event, data), ...]}``; ``outputs`` is what the history API
    shows (e.g. ``{"9": {"images": [{"filename", "subfolder", "type"}]}}``).
    Raises ``PromptValidationError`` for an invalid prompt and
    ``PromptExecutionError`` (with ComfyUI's exception message and traceback)
    if a node failed.  A fresh executor (no cache) is used unless one is passed.
    """
    _require_bootstrap()
    import execution
    outputs_to_run = validate(api_prompt)
    server = StubServer()
    if executor is None:
        executor = execution.PromptExecutor(server, cache_type=False)
    else:
        executor.server = server
    prompt_id = str(uuid.uuid4())
    executor.execute(api_prompt, prompt_id, dict(extra_data or {}), outputs_to_run)

    messages = list(executor.status_messages)
    failed = [data for event, data in messages if event in ("execution_error", "execution_interrupted")]
    succeeded = any(event == "execution_success" for event, _ in messages)
    if failed or not succeeded or not executor.success:
        details = failed[0] if failed else {}
        msg = "prompt execution failed"
        if details:
            msg += " in node {} ({}): {}: {}".format(details.get("node_id"), details.get("node_type"),
                                                     details.get("exception_type"), details.get("exception_message"))
            tb = details.get("traceback")
            if tb:
                msg += "\n" + "".join(tb)
        raise PromptExecutionError(msg, details)
    result = dict(executor.history_result)
    result["prompt_id"] = prompt_id
    result["events"] = messages
    return result


def output_image_paths(result, prefer=("output", "temp")):
    """Absolute paths of the images in a ``run_prompt`` result (SaveImage before PreviewImage)."""
    import folder_paths
    found = []
    for node_id, ui in result.get("outputs", {}).items():
        for img in (ui or {}).get("images", []) or []:
            if not isinstance(img, dict) or "filename" not in img:
                continue
            base = folder_paths.get_directory_by_type(img.get("type", "output"))
            if base is None:
                continue
            path = os.path.join(base, img.get("subfolder", ""), img["filename"])
            found.append((img.get("type", "output"), node_id, path))
    order = {t: i for i, t in enumerate(prefer)}
    found.sort(key=lambda f: (order.get(f[0], len(order)), _node_sort_key(f[1])))
    return [f[2] for f in found]


def _node_sort_key(node_id):
    s = str(node_id)
    return (0, int(s), s) if s.isdigit() else (1, 0, s)


# ---------------------------------------------------------------------------
# UI-format workflows
# ---------------------------------------------------------------------------

#: Node types that exist only in the frontend (never sent to the backend).
FRONTEND_ONLY = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
#: Values of the frontend's extra "control after generate" widget.
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
MODE_NEVER = 2    # "muted": not executed, dropped from the API prompt
MODE_BYPASS = 4   # bypassed: inputs passed through to outputs of the same type


def _input_specs(class_type):
    """[(name, type, options, is_optional)] of a node class, required first, in declaration order."""
    import nodes
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    types = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, spec in (types.get(section) or {}).items():
            if not isinstance(spec, (list, tuple)) or len(spec) == 0:
                spec = (spec,)
            typ = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            out.append((name, typ, opts, section == "optional"))
    return out


def _is_widget(typ, opts):
    if opts.get("forceInput") or opts.get("rawLink"):
        return False
    if isinstance(typ, (list, tuple)):
        return True  # combo
    return isinstance(typ, str) and typ in _WIDGET_TYPES


def _has_control_widget(name, typ, opts):
    """Whether the frontend adds a 'control after generate' widget after this input."""
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return typ == "INT" and name in ("seed", "noise_seed")


def _has_upload_widget(opts):
    return any(opts.get(k) for k in _UPLOAD_OPTIONS)


def _map_widget_values(class_type, values):
    """Map a node's ``widgets_values`` onto its widget inputs, as the frontend does: by position, with the
    frontend-only values (the control-after-generate mode after seeds, the upload button of LoadImage) taken where
    they are present. Values missing at the end are the defaults of optional widgets (a workflow saved before an
    optional input was added loads); a missing required widget is a problem.

    Returns ``(mapping, problems)``.
    """
    problems = []
    widgets = [(n, t, o, opt) for n, t, o, opt in _input_specs(class_type) if _is_widget(t, o)]
    if values is None:
        values = []
    if isinstance(values, dict):  # some frontend extensions save widgets by name
        unknown = [k for k in values if k not in {n for n, _, _, _ in widgets}]
        mapping = {n: values[n] for n, _, _, _ in widgets if n in values}
        return mapping, [f"unknown widget(s) {unknown}"] if unknown else []
    mapping = {}
    i = 0
    for name, typ, opts, optional in widgets:
        if i >= len(values):
            if not optional:
                problems.append(f"{len(values)} widget values but the node has more widgets (missing '{name}')")
                return mapping, problems
            continue  # a trailing optional widget saved before it existed: its default
        mapping[name] = values[i]
        i += 1
        if i < len(values):
            nxt = values[i]
            if _has_control_widget(name, typ, opts) and isinstance(nxt, str) and nxt in CONTROL_VALUES:
                i += 1
            elif _has_upload_widget(opts) and (nxt is None or isinstance(nxt, str)) \
                    and _upload_value_expected(widgets, name, values, i):
                i += 1  # LoadImage-style upload button value
    if i != len(values):
        problems.append(f"{len(values)} widget values for {len(widgets)} widget inputs {[w[0] for w in widgets]}")
    for name, typ, _, _ in widgets:
        if name in mapping and not _value_fits(typ, mapping[name]):
            problems.append("widget '{}' ({}) got {!r}: widget values out of step with the definition".format(
                name, typ if isinstance(typ, str) else "COMBO", mapping[name]))
    return mapping, problems


def _upload_value_expected(widgets, name, values, i):
    """An upload button's value is there when more values remain than the widgets after ``name`` take."""
    k = next(j for j, w in enumerate(widgets) if w[0] == name)
    return (len(values) - i) > (len(widgets) - k - 1)


def _value_fits(typ, value):
    """Loose type check of a widget value (catches values shifted by one position)."""
    if value is None:
        return True
    if typ == "INT":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
    if typ == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ == "BOOLEAN":
        return isinstance(value, bool)
    if typ == "STRING":
        return isinstance(value, str)
    return True  # combos: the option list depends on the files present


def _index_ui(ui):
    if not isinstance(ui, dict) or "nodes" not in ui:
        raise ValueError("not a UI-format workflow (no 'nodes' list)")
    if (ui.get("definitions") or {}).get("subgraphs"):
        raise NotImplementedError("workflows with subgraphs are not supported by ui_to_api")
    nodes_by_id = {n["id"]: n for n in ui["nodes"]}
    links = {}
    for link in ui.get("links", []) or []:
        if isinstance(link, dict):  # newer serialisation
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                 link.get("type"))
        else:
            links[link[0]] = (link[1], link[2], link[3], link[4], link[5] if len(link) > 5 else None)
    return nodes_by_id, links


def _resolve_source(nodes_by_id, links, link_id, seen=None):
    """Follow a link back through Reroutes and bypassed nodes.

    Returns ``("link", node_id, slot)``, ``("value", v)`` for a PrimitiveNode,
    or ``None`` when the source is muted/missing.
    """
    seen = seen or set()
    if link_id in seen or link_id not in links:
        return None
    seen.add(link_id)
    origin_id, origin_slot, _, _, ltype = links[link_id]
    src = nodes_by_id.get(origin_id)
    if src is None:
        return None
    stype = src.get("type")
    mode = src.get("mode", 0)
    if stype == "Reroute":
        ins = src.get("inputs") or []
        if not ins or ins[0].get("link") is None:
            return None
        return _resolve_source(nodes_by_id, links, ins[0]["link"], seen)
    if stype == "PrimitiveNode":
        vals = src.get("widgets_values") or []
        return ("value", vals[0]) if vals else None
    if mode == MODE_NEVER:
        return None
    if mode == MODE_BYPASS:
        out_type = ltype
        outs = src.get("outputs") or []
        if origin_slot < len(outs):
            out_type = outs[origin_slot].get("type", ltype)
        ins = src.get("inputs") or []
        # same slot index first, then any input of the same type (as the frontend does)
        candidates = ([ins[origin_slot]] if origin_slot < len(ins) else []) + list(ins)
        for inp in candidates:
            if inp.get("link") is not None and inp.get("type") == out_type:
                return _resolve_source(nodes_by_id, links, inp["link"], seen)
        return None
    return ("link", origin_id, origin_slot)


def _ui_input_name(inp):
    widget = inp.get("widget")
    if isinstance(widget, dict) and widget.get("name"):
        return widget["name"]
    return inp.get("name")


def check_ui_workflow(ui):
    """Raise ``ValueError`` listing every mismatch between a UI workflow and the registered nodes.

    Checks: every node type is known (or frontend-only), every input slot name
    exists in the node's definition, the number of widget values matches the
    definition (allowing the frontend's extra control/upload values), and
    required non-widget inputs are connected.  Muted/bypassed nodes are
    checked too (they must still exist to be loadable).
    """
    _require_bootstrap()
    import nodes
    nodes_by_id, links = _index_ui(ui)
    problems = []
    for nid, node in sorted(nodes_by_id.items(), key=lambda kv: _node_sort_key(kv[0])):
        ntype = node.get("type")
        where = f"node {nid} ({ntype})"
        if ntype in FRONTEND_ONLY:
            continue
        if ntype not in nodes.NODE_CLASS_MAPPINGS:
            problems.append(f"{where}: unknown node type")
            continue
        specs = {n: (t, o, opt) for n, t, o, opt in _input_specs(ntype)}
        connected = set()
        for inp in node.get("inputs") or []:
            name = _ui_input_name(inp)
            if name not in specs:
                problems.append(f"{where}: input '{name}' is not in the node definition")
            elif inp.get("link") is not None:
                connected.add(name)
        _, wproblems = _map_widget_values(ntype, node.get("widgets_values"))
        problems += [f"{where}: {p}" for p in wproblems]
        if node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        for name, (typ, opts, optional) in specs.items():
            if not optional and not _is_widget(typ, opts) and name not in connected:
                problems.append(f"{where}: required input '{name}' is not connected")
    if problems:
        raise ValueError("UI workflow does not match the node definitions:\n  " + "\n  ".join(problems))


def ui_to_api(ui_workflow):
    """Convert a frontend-saved (UI-format) workflow to an API-format prompt.

    Widget values are assigned to the widget inputs in declaration order
    (required then optional), skipping the extra control-after-generate value
    after seeds and the upload value of image loaders; linked inputs become
    ``[source_node_id, slot]`` (through Reroutes and bypassed nodes; a link from
    a PrimitiveNode becomes its value); converted widgets that are linked take
    the link.  Frontend-only nodes and muted nodes are dropped.  Already-API
    dicts are returned unchanged.
    """
    _require_bootstrap()
    import nodes
    if is_api_format(ui_workflow):
        return ui_workflow
    nodes_by_id, links = _index_ui(ui_workflow)
    prompt = {}
    for nid, node in sorted(nodes_by_id.items(), key=lambda kv: _node_sort_key(kv[0])):
        ntype = node.get("type")
        if ntype in FRONTEND_ONLY or node.get("mode", 0) in (MODE_NEVER, MODE_BYPASS):
            continue
        if ntype not in nodes.NODE_CLASS_MAPPINGS:
            raise ValueError(f"node {nid}: unknown node type {ntype!r}")
        inputs, problems = _map_widget_values(ntype, node.get("widgets_values"))
        if problems:
            raise ValueError("node {} ({}): {}".format(nid, ntype, "; ".join(problems)))
        for inp in node.get("inputs") or []:
            name = _ui_input_name(inp)
            if inp.get("link") is None:
                continue
            src = _resolve_source(nodes_by_id, links, inp["link"])
            if src is None:
                inputs.pop(name, None)
            elif src[0] == "value":
                inputs[name] = src[1]
            else:
                inputs[name] = [str(src[1]), src[2]]
        entry = {"class_type": ntype, "inputs": inputs}
        title = node.get("title")
        if title:
            entry["_meta"] = {"title": title}
        prompt[str(nid)] = entry
    return prompt


def is_api_format(workflow):
    """True for an API-format prompt ({id: {"class_type", "inputs"}})."""
    return (isinstance(workflow, dict) and "nodes" not in workflow and len(workflow) > 0
            and all(isinstance(v, dict) and "class_type" in v for v in workflow.values()))
