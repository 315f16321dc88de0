"""Weights under ComfyUI's model management: adapter modules, LoRA files, and trainable weight wrappers."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import torch

from ...training.lora import LoRASet, select_targets
from ...training.run import fingerprint
from .folders import full_path


def adapter_patcher(module: torch.nn.Module):
    """A ModelPatcher for adapter weights, so ComfyUI loads them with the UNet and offloads them after."""
    return comfy.model_patcher.ModelPatcher(module, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def prepare_adapter(patcher, dtype: torch.dtype) -> None:
    """Cast the adapter to the model's compute dtype (once) and load it to the compute device."""
    module = patcher.model
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    mm.load_models_gpu([patcher])


def model_with_lora(model, lora_state: dict, strength: float = 1.0):
    """``model`` with a LoRA state dict in ComfyUI's key format applied as the stock LoraLoaderModelOnly does."""
    return comfy.sd.load_lora_for_models(model, None, lora_state, strength, 0)[0]


def apply_lora(model, lora_name: str, strength: float):
    """``(model, layers)``: a LoRA from models/loras on the model (UNet only), as ComfyUI's LoraLoaderModelOnly does,
    and how many of the model's weights it changes. A file that changes none (not a LoRA, or one for another model,
    which ComfyUI only logs key by key) is an error."""
    lora = comfy.utils.load_torch_file(full_path("loras", lora_name, "LoRA"), safe_load=True)
    out = model_with_lora(model, lora, strength)
    layers = sum(len(v) > len(model.patches.get(k, ())) for k, v in out.patches.items())
    if not layers:
        raise ValueError(f"{lora_name} changes no weight of this model ({len(lora)} tensors in the file): it is not a "
                         "LoRA, or one made for another model; choose the LoRA released with the adapter")
    return out, layers


def training_lora(model, targets, rank: int, alpha, seed: int) -> LoRASet:
    """A LoRA set on the UNet modules matching ``targets``, named by their LDM paths (``input_blocks.1.1...``)."""
    dm = model.model.diffusion_model
    names = select_targets([n for n, m in dm.named_modules() if hasattr(m, "weight_function")], targets)
    shapes = {n: tuple(dm.get_submodule(n).weight.shape) for n in names}
    return LoRASet(shapes, rank=rank, alpha=alpha, seed=seed)


def _fresh_copy(tensor):
    return tensor  # ComfyUI casts a wrapped weight into a new tensor before calling this (cast_to(copy=True))


def attach_training_lora(model, lora: LoRASet):
    """A clone of ``model`` computing every target weight as ``delta(weight)`` (differentiable, switchable).

    When the UNet's weights were made under inference mode (a checkpoint loaded by a node), autograd may not save
    them for the backward pass; every other weight and bias then gets an identity wrapper too, so that ComfyUI hands
    the layers per-forward copies that are normal tensors (what ComfyUI's own TrainLoraNode does by wrapping all)."""
    patched = model.clone()
    targets = set(lora.names)
    for name, delta in lora.items():
        patched.add_weight_wrapper(f"diffusion_model.{name}.weight", delta)
    dm = model.model.diffusion_model
    if any(p.is_inference() for p in dm.parameters()):
        for name, m in dm.named_modules():
            if not hasattr(m, "weight_function"):
                continue
            if getattr(m, "weight", None) is not None and name not in targets:
                patched.add_weight_wrapper(f"diffusion_model.{name}.weight", _fresh_copy)
            if getattr(m, "bias", None) is not None:
                patched.add_weight_wrapper(f"diffusion_model.{name}.bias", _fresh_copy)
    return patched


def _patch_tensors(value, name: str):
    """The tensors inside one ModelPatcher weight patch (a tensor, tuples of them, or a weight adapter's
    ``weights``), named by their position."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _patch_tensors(v, f"{name}.{i}")
    elif hasattr(value, "weights"):  # comfy.weight_adapter adapters (LoRA, LoHa, LoKr, ...)
        yield from _patch_tensors(value.weights, f"{name}.{type(value).__name__}")


def model_fingerprint(model) -> str | None:
    """A fingerprint (:func:`~...training.run.fingerprint`) of what the model computes: the UNet's weights, the weight
    patches on it (a LoRA loaded before the trainer, with its strengths) and its sampling schedule. None when the
    model carries attention or block patches (another pack's, an IP-Adapter...), whose effect cannot be read from
    tensors: results of such a model are not cached."""
    to = model.model_options.get("transformer_options", {})
    if any(to.get(k) for k in ("patches", "patches_replace")) or model.model_options.get("model_function_wrapper"):
        return None

    def tensors():
        yield from model.model.diffusion_model.state_dict().items()
        for key in sorted(model.patches):
            for i, (strength, value, strength_model, offset, function) in enumerate(model.patches[key]):
                yield from _patch_tensors(value, f"patch.{key}.{i}.{strength}.{strength_model}.{offset}.{function is not None}")
        yield "model_sampling.sigmas", model.get_model_object("model_sampling").sigmas

    return fingerprint(tensors(), [type(model.model).__name__])
