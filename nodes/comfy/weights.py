"""Weights under ComfyUI's model management: adapter modules, LoRA files, and trainable weight wrappers."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.utils
import comfy.weight_adapter
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


# ---------------------------------------------------------------------------------------------------------------
# E4T weight offsets: W' = (W + D) * (1 + dW) on attention q / k / v


def diffusers_to_ldm_keys(model) -> dict[str, str]:
    """diffusers UNet module paths -> ComfyUI weight keys (``diffusion_model.input_blocks.1.1...attn1.to_q.weight``),
    from ComfyUI's own table (``comfy.utils.unet_to_diffusers``, as comfy/lora.py uses it)."""
    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    return {k[: -len(".weight")]: "diffusion_model." + v for k, v in table.items() if k.endswith(".weight")}


def offset_keys(model, names) -> dict[str, str]:
    """``{diffusers projection path: ComfyUI weight key}`` for weight-offset targets; a target the model does not have is
    an error (offsets made for another UNet)."""
    table, sd_keys = diffusers_to_ldm_keys(model), set(model.model.state_dict())
    out, missing = {}, []
    for name in names:
        key = table.get(name)
        if key is None or key not in sd_keys:
            missing.append(name)
        else:
            out[name] = key
    if missing:
        raise ValueError(f"{len(missing)} of the {len(names)} weight-offset targets are not in this model (first: "
                         f"{missing[0]}): the E4T weights were made for another UNet (E4T's public weights are for SD1.x)")
    return out


class OffsetAdapter(comfy.weight_adapter.WeightAdapterBase):
    """A ComfyUI weight patch computing ``(W + D) * (1 + strength * dW)`` from precomputed tensors (``D`` optional: the
    tuned full-size delta). Applied by ComfyUI's weight patching once per load (exact, no per-step cost, the same
    path low-VRAM loading takes)."""

    name = "personalize_e4t_offset"

    def __init__(self, delta_w: torch.Tensor, full_delta: torch.Tensor | None = None):
        self.loaded_keys = set()
        self.weights = [delta_w] + ([full_delta] if full_delta is not None else [])
        self.delta_w, self.full_delta = delta_w, full_delta

    def calculate_weight(self, weight, key, strength, strength_model, offset, function, intermediate_dtype=torch.float32,
                         original_weight=None):
        dw = mm.cast_to_device(self.delta_w, weight.device, intermediate_dtype)
        w = weight.to(intermediate_dtype)
        if self.full_delta is not None:
            w = w + mm.cast_to_device(self.full_delta, weight.device, intermediate_dtype)
        return (w * (1 + strength * dw)).to(weight.dtype)


def bake_offsets(model, deltas: dict[str, torch.Tensor], full: dict[str, torch.Tensor] | None = None, strength: float = 1.0):
    """A clone of ``model`` whose q / k / v weights are ``(W + D) * (1 + dW)`` (``deltas``: diffusers path -> dW,
    ``full``: ComfyUI weight key -> D for any weight or bias, the tuned UNet)."""
    keys = offset_keys(model, list(deltas))
    full = dict(full or {})
    patches = {keys[n]: OffsetAdapter(d.detach().float().cpu(), full.pop(keys[n], None)) for n, d in deltas.items()}
    patches.update({k: (d.detach().float().cpu(),) for k, d in full.items()})  # plain "diff" patches: W + D
    out = model.clone()
    added = out.add_patches(patches, strength)
    if len(added) != len(patches):
        raise ValueError(f"{len(patches) - len(added)} E4T weight patches found no weight in the model")
    return out


class _TrainableWeight(torch.nn.Module):
    """A weight function ``w -> (w + D) * (1 + dW)`` for training (each part optional, differentiable); dW is computed
    once per parameter update (:class:`OffsetCache`)."""

    def __init__(self, full=None, lora=None, offset=None):
        super().__init__()
        self.full, self.lora, self.offset = full, lora, offset

    def forward(self, w):
        if self.full is not None:
            w = w + self.full.to(w)
        if self.lora is not None:
            w = self.lora(w)
        if self.offset is not None:
            w = w * (1 + self.offset().to(w))
        return w

    def move_to(self, device=None) -> int:
        return 0  # the trainable tensors are moved by the training node, with the optimizer state


class OffsetCache:
    """dW of one generator, recomputed (with autograd) only after its parameters changed: both UNet passes of a
    training step share one graph of the generator. :meth:`refresh` runs before the step's UNet passes (outside any
    gradient-checkpointed layer: a value first computed inside one would not be recomputed alike in the backward)."""

    def __init__(self, generator: torch.nn.Module):
        self.generator, self._key, self._value = generator, None, None

    def refresh(self) -> None:
        key = tuple(p._version for p in self.generator.parameters()) + (torch.is_grad_enabled(),)
        if key != self._key or self._value is None:
            self._value, self._key = self.generator(), key

    def __call__(self):
        if self._value is None:
            self.refresh()
        return self._value


class OffsetCaches:
    """The :class:`OffsetCache` of every generator of an :class:`~...models.e4t.OffsetSet`."""

    def __init__(self, offsets):
        self.caches = {name: OffsetCache(g) for name, g in offsets.items()}

    def __getitem__(self, name: str) -> OffsetCache:
        return self.caches[name]

    def refresh(self) -> None:
        for c in self.caches.values():
            c.refresh()


def attach_e4t_training(model, offsets: OffsetCaches | None, full=None, lora=None):
    """A clone of ``model`` whose UNet computes with trainable E4T weights: ``(W + D) * (1 + dW)`` on the offset
    targets, ``W + D`` elsewhere (``full``: :class:`~...training.e4t.FullDeltas` over ComfyUI weight keys, the reference
    tuning), or ``lora`` (a :class:`~...training.lora.LoRASet` on LDM module paths, the light mode). Weights made under
    inference mode get an identity wrapper (per-forward copies that autograd can save), as :func:`attach_training_lora`.
    ``offsets``: the generators' :class:`OffsetCaches`; refresh them before each step's UNet passes."""
    patched = model.clone()
    keys = offset_keys(model, list(offsets.caches)) if offsets is not None else {}
    by_key = {k: n for n, k in keys.items()}
    dm = model.model.diffusion_model
    inference = any(p.is_inference() for p in dm.parameters())
    lora_names = set(lora.names) if lora is not None else set()
    for name, m in dm.named_modules():
        if not hasattr(m, "weight_function"):
            continue
        for part in ("weight", "bias"):
            if getattr(m, part, None) is None:
                continue
            key = f"diffusion_model.{name}.{part}"
            fn = _TrainableWeight(
                full=full[key] if full is not None and key in full.names else None,
                lora=lora[name] if part == "weight" and name in lora_names else None,
                offset=offsets[by_key[key]] if key in by_key else None)
            if fn.full is None and fn.lora is None and fn.offset is None:
                if not inference:
                    continue
                fn = _fresh_copy
            patched.add_weight_wrapper(key, fn)
    return patched


def unet_weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """``{ComfyUI key: shape}`` of every UNet weight and bias a weight function can reach (the reference tuning trains
    all of them)."""
    dm = model.model.diffusion_model
    out = {}
    for name, m in dm.named_modules():
        if hasattr(m, "weight_function"):
            for part in ("weight", "bias"):
                t = getattr(m, part, None)
                if t is not None:
                    out[f"diffusion_model.{name}.{part}"] = tuple(t.shape)
    return out


def e4t_diff_state(model, deltas: dict[str, torch.Tensor], full=None, lora=None) -> dict[str, torch.Tensor]:
    """The tuned UNet as stock ComfyUI "diff" LoRA keys (``<key without .weight>.diff`` / ``.diff_b``, comfy/lora.py),
    relative to ``model``'s weights: ``(W + D) * (1 + dW) - W`` on the offset targets, ``D`` (or the LoRA's product)
    elsewhere. ``LoraLoaderModelOnly`` at strength 1 then rebuilds the tuned UNet."""
    keys = offset_keys(model, list(deltas))
    sd = model.model.state_dict()
    out = {}
    weights_of = {k: n for n, k in keys.items()}
    touched = set(weights_of) | (set(full.names) if full is not None else set())
    if lora is not None:
        touched |= {f"diffusion_model.{n}.weight" for n in lora.names}
    for key in sorted(touched):
        w = sd[key].detach().float().cpu()
        new = w
        if full is not None and key in full.names:
            new = new + full[key].detach().float().cpu()
        if lora is not None and key.endswith(".weight") and key[len("diffusion_model."):-len(".weight")] in lora.names:
            new = lora[key[len("diffusion_model."):-len(".weight")]](new)
        if key in weights_of:
            new = new * (1 + deltas[weights_of[key]].detach().float().cpu())
        diff = (new - w).contiguous()
        if not bool(diff.any()):
            continue
        stem = key[: -len(".weight")] + ".diff" if key.endswith(".weight") else key[: -len(".bias")] + ".diff_b"
        out[stem] = diff
    return out


def free_memory(device) -> int:
    return int(mm.get_free_memory(device))


def compute_device():
    return mm.get_torch_device()


def load_companions(patchers) -> None:
    mm.load_models_gpu(list(patchers))


def has_weight_patches(model) -> bool:
    """Whether the UNet's attention projections carry weight patches (a LoRA, a tuned E4T UNet)."""
    return any(k.endswith(("attn1.to_q.weight", "attn2.to_k.weight")) and v for k, v in model.patches.items())


def has_offset_patches(model) -> bool:
    """Whether E4T weight offsets are baked into the model already."""
    return any(isinstance(p[1], OffsetAdapter) for patches in model.patches.values() for p in patches)
