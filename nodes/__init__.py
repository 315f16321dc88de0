"""ComfyUI node classes of the pack. Importing this registers the pack's model folders."""
from . import e4t, face, ipadapter, ipadapter_tools, pulid, train
from .comfy import folders

folders.register_model_folders()

_ALL = {**ipadapter.NODES, **ipadapter_tools.NODES, **face.NODES, **pulid.NODES, **e4t.NODES, **train.NODES}
NODE_CLASS_MAPPINGS = {node_id: cls for node_id, (_, cls) in _ALL.items()}
NODE_DISPLAY_NAME_MAPPINGS = {node_id: name for node_id, (name, _) in _ALL.items()}
