"""Node classes of the loaded pack run as ComfyUI's executor runs them: under ``torch.inference_mode()`` (the tier-2
tests that call node functions directly)."""
import torch


def under_inference(cls):
    """A factory like the node class whose node's function runs under inference mode."""
    def make():
        node = cls()
        fn = getattr(node, cls.FUNCTION)

        def run(*a, **k):
            with torch.inference_mode():
                return fn(*a, **k)
        setattr(node, cls.FUNCTION, run)
        return node
    return make


def inference_nodes(mappings: dict) -> dict:
    """``{node id: factory}`` for every node of ``mappings`` (NODE_CLASS_MAPPINGS)."""
    return {k: under_inference(v) for k, v in mappings.items()}
