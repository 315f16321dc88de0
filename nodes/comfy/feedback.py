"""What a running node shows the user besides its outputs: a line of text on the node (ComfyUI's progress text, the
executing node's) and live preview pictures through ComfyUI's progress bar."""
from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("personalize")
PREVIEW_MAX_SIDE = 512  # ComfyUI's previews are sent at most this large (its latent previews use 512)


def node_text(text: str) -> None:
    """Show ``text`` on the executing node (the server's progress-text message); nothing without a server (tests,
    scripts)."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
    except ImportError:
        return
    server, ctx = getattr(PromptServer, "instance", None), get_executing_context()
    if server is None or ctx is None:
        return
    try:
        server.send_progress_text(text, ctx.node_id)
    except Exception as err:  # a message that cannot be sent never fails a run
        log.debug("could not send the node text: %s", err)


def is_cancel(err: BaseException) -> bool:
    """Whether ``err`` is ComfyUI's Cancel (the interrupt the executor raises), not a failure."""
    import comfy.model_management as mm

    return isinstance(err, mm.InterruptProcessingException)


def preview(images: torch.Tensor) -> tuple:
    """The first image of an IMAGE batch ``(B, H, W, 3)`` in [0, 1] as the preview ``ProgressBar.update_absolute``
    sends (``(format, PIL image, max side)``, ComfyUI's latent-preview form)."""
    from PIL import Image

    arr = (images[0, ..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return "JPEG", Image.fromarray(arr), PREVIEW_MAX_SIDE
