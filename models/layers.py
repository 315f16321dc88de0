"""Layer tables: where the cross-attention sites of the SD UNets are, and the IP-Adapter weight types.

Vocabulary (ComfyUI's, see comfy/ldm/modules/diffusionmodules/openaimodel.py):
- a *transformer* is one SpatialTransformer; ``transformer_index`` counts them in execution order
  (input blocks, then the middle block, then output blocks);
- a transformer holds ``depth`` BasicTransformerBlocks; ``block_index`` is the position inside it;
- a *site* is one cross-attention (attn2) layer: ``(block, block_id, block_index)``.
IP-Adapter checkpoints number their layers by the position of the processor in diffusers'
``unet.attn_processors``: down blocks, then up blocks, then the mid block, attn1 and attn2 interleaved, so the
k-th cross-attention site in that order carries the keys ``f"{2k+1}.to_k_ip.weight"`` (tencent-ailab/IP-Adapter
``ip_adapter.py`` ``IPAdapter.load_ip_adapter``: ``ip_adapter`` is loaded into
``torch.nn.ModuleList(unet.attn_processors.values())``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# diffusers registers down_blocks and up_blocks before mid_block, so attn_processors lists the mid block last.
BLOCK_ORDER_ADAPTER = ("input", "output", "middle")


@dataclass(frozen=True)
class Transformer:
    block: str  # "input" | "middle" | "output"
    block_id: int  # index into input_blocks / output_blocks (0 for the middle block)
    depth: int  # number of BasicTransformerBlocks (cross-attention sites) inside


@dataclass(frozen=True)
class Site:
    block: str
    block_id: int
    block_index: int
    transformer_index: int  # ComfyUI's extra_options["transformer_index"]
    adapter_index: int  # k: the checkpoint keys of this site are f"{2k+1}.to_k_ip.weight" / ".to_v_ip.weight"
    width: int = 0  # channels of the layer (heads * dim_head); 0 when unknown

    @property
    def key(self) -> tuple:
        """The ComfyUI patch key, with block_index."""
        return (self.block, self.block_id, self.block_index)


def sites_from_transformers(transformers: list[Transformer], widths: list[int] | None = None) -> list[Site]:
    """Number the sites of a UNet given its transformers in execution order.

    ``widths`` (one per transformer) is copied to the sites. Returns sites in execution order.
    """
    execution = []
    for t_idx, t in enumerate(transformers):
        for bi in range(t.depth):
            execution.append((t, t_idx, bi, widths[t_idx] if widths else 0))
    adapter_order = sorted(
        range(len(execution)),
        key=lambda i: (BLOCK_ORDER_ADAPTER.index(execution[i][0].block), i),
    )
    adapter_index = {pos: k for k, pos in enumerate(adapter_order)}
    return [
        Site(t.block, t.block_id, bi, t_idx, adapter_index[i], w)
        for i, (t, t_idx, bi, w) in enumerate(execution)
    ]


# SD1.5 (and SD2.x): transformers after input blocks 1,2,4,5,7,8, the middle block, output blocks 3..11; depth 1.
SD15_TRANSFORMERS = (
    [Transformer("input", i, 1) for i in (1, 2, 4, 5, 7, 8)]
    + [Transformer("middle", 0, 1)]
    + [Transformer("output", i, 1) for i in range(3, 12)]
)
# SDXL: transformer_depth [0, 2, 10] per level: input 4,5 (depth 2), input 7,8 (10), middle (10),
# output 0,1,2 (10), output 3,4,5 (2). 70 cross-attention sites.
SDXL_TRANSFORMERS = (
    [Transformer("input", 4, 2), Transformer("input", 5, 2), Transformer("input", 7, 10), Transformer("input", 8, 10)]
    + [Transformer("middle", 0, 10)]
    + [Transformer("output", i, 10) for i in (0, 1, 2)]
    + [Transformer("output", i, 2) for i in (3, 4, 5)]
)
# Known layouts by number of cross-attention sites (= number of layer pairs in an IP-Adapter checkpoint).
LAYOUTS = {16: "sd15", 70: "sdxl"}
LAYOUT_TRANSFORMERS = {"sd15": SD15_TRANSFORMERS, "sdxl": SDXL_TRANSFORMERS}
LAYOUT_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL", "flux": "Flux"}

def check_sites(what: str, layout: str, widths: tuple[int, ...], cross_dim: int, transformers: list[Transformer],
                sites: list[Site], context_dim: int, examples: dict[str, str]) -> None:
    """Raise unless an adapter with per-site ``widths`` (adapter order) and token width ``cross_dim``, made for
    ``layout``, fits a UNet with these transformers, sites and context width (what a host found in its model). The
    message says what was found and what to load instead (``examples``: a file per layout)."""
    found = next((name for name, t in LAYOUT_TRANSFORMERS.items() if list(t) == transformers), None)
    model_name = LAYOUT_NAMES.get(found, f"a UNet with {len(sites)} cross-attention layers")
    if found != layout or len(sites) != len(widths):
        hint = f" (e.g. {examples[found]})" if found in examples else ""
        raise ValueError(f"adapter/model mismatch: the {what} is for {LAYOUT_NAMES[layout]} ({len(widths)} layers) "
                         f"but the model is {model_name}. Load an {model_name} {what}{hint}.")
    model_widths = [0] * len(sites)
    for s in sites:
        model_widths[s.adapter_index] = s.width
    if tuple(model_widths) != tuple(widths) or context_dim != cross_dim:
        raise ValueError(f"adapter/model mismatch: the {what}'s layers take width {cross_dim} and produce "
                         f"{sorted(set(widths))}, the model's cross-attention takes {context_dim} and has "
                         f"{sorted(set(model_widths))}: this adapter belongs to another {LAYOUT_NAMES[layout]} model family")


# ---------------------------------------------------------------------------------------------------------------
# Weight types. Conventions of ComfyUI_IPAdapter_plus (``IPAdapterPlus.py``, ``WEIGHT_TYPES``), which users' workflows rely on;
# none of them is part of the IP-Adapter paper. Tables are keyed by transformer_index.

# "ease" curves: w * (EASE_FLOOR + EASE_SPAN * f(t / L)), L = number of transformers (16 SD1.5, 11 SDXL).
EASE_FLOOR, EASE_SPAN = 0.05, 0.95
# "weak <block>" multiplies that block type by WEAK_FACTOR; "strong middle" weakens input and output instead.
WEAK_FACTOR = 0.2
# Style / composition layers (InstantStyle, Wang et al. 2024: SDXL up_blocks.0.attentions.1 carries style,
# down_blocks.2.attentions.1 carries layout; SD1.5 tables are the popular pack's).
STYLE_LAYERS = {"sdxl": {6: 1.0}, "sd15": dict.fromkeys((0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15), 1.0)}
STRONG_STYLE_LAYERS = {
    "sdxl": dict.fromkeys((0, 1, 2, 4, 5, 6, 7, 8, 9, 10), 1.0),
    "sd15": dict.fromkeys((0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), 1.0),
}
COMPOSITION_LAYERS = {"sdxl": {3: 1.0}, "sd15": {4: 0.25, 5: 1.0}}

WEIGHT_TYPES = (
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak middle",
    "weak output",
    "strong middle",
    "style transfer",
    "strong style transfer",
    "composition",
    "style and composition",
    "style transfer precise",
    "composition precise",
)
# Token sets a layer can attend to: the reference (MAIN), the second image of "style and composition" (ALT), or the
# reference as a *negative* (NEGATED: the cond pass attends to zero tokens and the uncond pass to the reference),
# which the "precise" types use on the layers they push away from (ComfyUI_IPAdapter_plus ``CrossAttentionPatch.py``:
# ``uncond = cond; cond = cond * 0``).
MAIN, ALT, NEGATED = False, True, "negated"
# "composition precise" keeps the other layers at this fraction of its boost (``weight * .1`` there).
PRECISE_OTHER_FACTOR = 0.1


def layer_weights(
    weight_type: str,
    transformers: list[Transformer],
    layout: str,
    weight: float,
    composition_weight: float = 1.0,
) -> dict[int, tuple[float, bool]]:
    """Per-transformer weights for a weight type: ``{transformer_index: (weight, use_composition_embeds)}``.

    Transformers missing from the result get no image attention at all (not even the cost of computing it).
    ``use_composition_embeds`` marks the layers that take the second (composition) image in
    "style and composition".
    """
    n = len(transformers)
    out: dict[int, tuple[float, bool | str]] = {}
    if weight_type in ("style transfer", "strong style transfer", "composition", "style and composition",
                       "style transfer precise", "composition precise"):
        if layout not in STYLE_LAYERS:
            raise ValueError(f"weight type {weight_type!r} has layer tables for SD1.5 and SDXL only, not {layout!r}")
        comp = COMPOSITION_LAYERS[layout]
        if weight_type == "composition":
            return {t: (weight * f, MAIN) for t, f in comp.items()}
        if weight_type == "style transfer precise":  # style layers, and the composition layers pushed away by the boost
            out = {t: (weight * f, MAIN) for t, f in STYLE_LAYERS[layout].items()}
            out.update({t: (composition_weight * f, NEGATED) for t, f in comp.items()})
            return out
        if weight_type == "composition precise":  # composition layers; every other layer pushed away, style at the boost
            style = STYLE_LAYERS[layout] if layout == "sdxl" else {}
            out = {t: (composition_weight * (1.0 if t in style else PRECISE_OTHER_FACTOR), NEGATED)
                   for t in range(n) if t not in comp}
            if layout == "sd15":  # the SD1.5 table keeps the style layers at the boost, the middle and the first
                # output layers at a tenth (IPAdapterPlus.py ``composition precise``)
                out = {t: (composition_weight * (PRECISE_OTHER_FACTOR if 6 <= t <= 8 else 1.0), NEGATED)
                       for t in range(n) if t not in comp}
            out.update({t: (weight * f, MAIN) for t, f in comp.items()})
            return out
        table = STRONG_STYLE_LAYERS if weight_type == "strong style transfer" else STYLE_LAYERS
        out = {t: (weight * f, MAIN) for t, f in table[layout].items()}
        if weight_type == "style and composition":
            out.update({t: (composition_weight * f, ALT) for t, f in comp.items()})
        return out
    for t_idx, t in enumerate(transformers):
        w = weight
        if weight_type in ("ease in", "ease out", "ease in-out", "reverse in-out"):
            x = t_idx / n
            mid = abs(t_idx - n / 2) / (n / 2)
            f = {"ease in": 1 - x, "ease out": x, "ease in-out": 1 - mid, "reverse in-out": mid}[weight_type]
            w = weight * (EASE_FLOOR + EASE_SPAN * f)
        elif weight_type.startswith("weak "):
            if t.block == weight_type[len("weak "):]:
                w = weight * WEAK_FACTOR
        elif weight_type == "strong middle":
            if t.block != "middle":
                w = weight * WEAK_FACTOR
        elif weight_type != "linear":
            raise ValueError(f"unknown weight type {weight_type!r}; expected one of {WEIGHT_TYPES}")
        out[t_idx] = (w, MAIN)
    return out


LAYER_INDEXING = ("cross-attention layer", "transformer")


def parse_layer_weights(text: str, count: int, what: str = "cross-attention layer") -> dict[int, float]:
    """Per-layer weights from a node's text: a list of ``count`` numbers (``"1, 0.5, 0, ..."``: one per layer, in
    execution order), or ``index:weight`` pairs (``"3:1.0, 6:0.5"``; ComfyUI_IPAdapter_plus' Mad Scientist format;
    the layers not named get nothing). Commas, spaces or new lines separate entries."""
    items = [x for x in text.replace("\n", ",").replace(";", ",").split(",") if x.strip()]
    if not items:
        raise ValueError(f"layer_weights is empty: give {count} numbers (one per {what}) or index:weight pairs")
    out: dict[int, float] = {}
    if all(":" in x for x in items):
        for x in items:
            k, _, v = x.partition(":")
            try:
                i, w = int(k.strip()), float(v.strip())
            except ValueError:
                raise ValueError(f"layer_weights: {x.strip()!r} is not index:weight (e.g. 3:0.8)") from None
            if not 0 <= i < count:
                raise ValueError(f"layer_weights: {what} {i} does not exist; this model has {count} (0 to {count - 1})")
            if i in out:
                raise ValueError(f"layer_weights: {what} {i} is given twice")
            out[i] = w
    elif any(":" in x for x in items):
        raise ValueError("layer_weights mixes index:weight pairs and plain numbers: use one form")
    else:
        try:
            values = [float(x) for x in items]
        except ValueError as e:
            raise ValueError(f"layer_weights: {e}; expected numbers separated by commas") from None
        if len(values) != count:
            raise ValueError(f"layer_weights lists {len(values)} weights but this model has {count} {what}s: give "
                             f"{count} numbers, or index:weight pairs")
        out = dict(enumerate(values))
    for i, w in out.items():
        if not math.isfinite(w):
            raise ValueError(f"layer_weights: the weight of {what} {i} is not a finite number")
    return out
