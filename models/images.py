"""Reference-image tools for the image-prompt nodes, host-free (torch, torchvision, PIL): noise negatives, the CLIP-vision
prep (crop position, resize, sharpening), and tiles of tall or wide references.

Semantics follow ComfyUI_IPAdapter_plus (``IPAdapterPlus.py`` ``IPAdapterNoise``, ``PrepImageForClipVision``,
``IPAdapterTiled``; ``utils.py`` ``contrast_adaptive_sharpening``), whose users' workflows rely on them; none of this is
part of the IP-Adapter paper. Images are ComfyUI IMAGE tensors ``[B, H, W, C]`` in 0..1.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NOISE_TYPES = ("fade", "dissolve", "gaussian", "shuffle")
# The noise image's size when no image is given (the CLIP input size of the ViT-H / bigG encoders).
NOISE_SIZE = 224
# "shuffle": an elastic transform (alpha 75, sigma (1 - strength) * 3.5), both flips, then noise of 0.75 * strength.
SHUFFLE_ALPHA, SHUFFLE_SIGMA, SHUFFLE_NOISE = 75.0, 3.5, 0.75
CROP_POSITIONS = ("top", "bottom", "left", "right", "center", "pad")
INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")
# Tiles: 256 px (the popular pack: "more likely divisible by the latent size"; CLIP resizes to 224), at most 4 along
# the long side; references with a side ratio within (0.75, 1.33) are cropped square and cut 2 x 2.
TILE_SIZE, MAX_TILES, SQUARE_RATIOS = 256, 4, (0.75, 1.33)


def _chw(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 3, 1, 2)


def _hwc(image: torch.Tensor) -> torch.Tensor:
    return image.permute(0, 2, 3, 1)


def noise_image(kind: str, strength: float, blur: int, seed: int, image: torch.Tensor | None = None) -> torch.Tensor:
    """A negative image: ``fade`` (``image * (1 - s) + uniform * s``), ``dissolve`` (a random ``s`` share of the
    pixels replaced by uniform noise), ``gaussian`` (``image + N(0, s)``), ``shuffle`` (elastic warp, flips, then
    ``image * (1 - n) + n`` with ``n ~ N(0, 0.75 s)``); clamped to 0..1, then an odd Gaussian blur of ``blur`` px.
    Without ``image``, a black 224 px square; with one, its centre square resized to 224 (bicubic, antialiased).
    ``seed`` makes it reproducible (the global RNG is left as it was)."""
    import torchvision.transforms as T

    if kind not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {kind!r}; expected one of {NOISE_TYPES}")
    if image is None:
        base = torch.zeros(1, NOISE_SIZE, NOISE_SIZE, 3)
    else:
        side = min(image.shape[1], image.shape[2])
        resize = T.Compose([T.CenterCrop(side), T.Resize((NOISE_SIZE, NOISE_SIZE), interpolation=T.InterpolationMode.BICUBIC,
                                                          antialias=True)])
        base = _hwc(resize(_chw(image[..., :3].float().cpu())))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if kind == "fade":
            out = base * (1 - strength) + torch.rand_like(base) * strength
        elif kind == "dissolve":
            mask = (torch.rand_like(base) < strength).float()
            out = base * (1 - mask) + torch.rand_like(base) * mask
        elif kind == "gaussian":
            out = base + torch.randn_like(base) * strength
        else:
            warp = T.Compose([T.ElasticTransform(alpha=SHUFFLE_ALPHA, sigma=(1 - strength) * SHUFFLE_SIGMA),
                              T.RandomVerticalFlip(p=1.0), T.RandomHorizontalFlip(p=1.0)])
            base = _hwc(warp(_chw(base)))
            n = torch.randn_like(base) * (strength * SHUFFLE_NOISE)
            out = base * (1 - n) + n
    out = out.clamp(0, 1)
    if blur > 0:
        k = blur + 1 if blur % 2 == 0 else blur
        out = _hwc(T.functional.gaussian_blur(_chw(out), k))
    return out


def contrast_adaptive_sharpening(image: torch.Tensor, amount: float) -> torch.Tensor:
    """AMD's CAS on ``[B, C, H, W]`` in 0..1 (the popular pack's ``contrast_adaptive_sharpening``): per pixel, a
    sharpening weight from the local min / max of the cross and diagonal neighbours."""
    img = F.pad(image, (1, 1, 1, 1))
    a, b, c = img[..., :-2, :-2], img[..., :-2, 1:-1], img[..., :-2, 2:]
    d, e, f = img[..., 1:-1, :-2], img[..., 1:-1, 1:-1], img[..., 1:-1, 2:]
    g, h, i = img[..., 2:, :-2], img[..., 2:, 1:-1], img[..., 2:, 2:]
    cross, diag = torch.stack((b, d, e, f, h)), torch.stack((a, c, g, i))
    mn = cross.min(dim=0).values + diag.min(dim=0).values
    mx = cross.max(dim=0).values + diag.max(dim=0).values
    amp = torch.sqrt(torch.reciprocal(mx) * torch.minimum(mn, 2 - mx))
    w = -amp * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    out = ((b + d + f + h) * w + e) * torch.reciprocal(1 + 4 * w)
    return torch.nan_to_num(out).clamp(0, 1)


def _pil_resize(chw: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Each image of ``[B, C, H, W]`` resized to ``size`` (width, height) through PIL (its LANCZOS and the others)."""
    import torchvision.transforms as T
    from PIL import Image

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; expected one of {INTERPOLATIONS}")
    return torch.stack([T.ToTensor()(T.ToPILImage()(img).resize(size, resample=Image.Resampling[interpolation]))
                        for img in chw.clamp(0, 1)])


def prep_for_clip_vision(image: torch.Tensor, interpolation: str = "LANCZOS", crop_position: str = "center",
                         sharpening: float = 0.0, size: int = 224) -> torch.Tensor:
    """The square a CLIP encoder sees, chosen by the user: ``crop_position`` top / bottom / left / right / center
    (the largest square there) or ``pad`` (black bars to a square), resized to ``size`` with PIL, then sharpened."""
    if crop_position not in CROP_POSITIONS:
        raise ValueError(f"unknown crop position {crop_position!r}; expected one of {CROP_POSITIONS}")
    x = _chw(image[..., :3].float().cpu())
    _, _, oh, ow = x.shape
    if crop_position == "pad":
        if oh > ow:
            p = (oh - ow) // 2
            x = F.pad(x, (p, p, 0, 0))
        elif ow > oh:
            p = (ow - oh) // 2
            x = F.pad(x, (0, 0, p, p))
    else:
        side = min(oh, ow)
        left, top = (ow - side) // 2, (oh - side) // 2
        if crop_position == "top":
            top = 0
        elif crop_position == "bottom":
            top = oh - side
        elif crop_position == "left":
            left = 0
        elif crop_position == "right":
            left = ow - side
        x = x[:, :, top:top + side, left:left + side]
    x = _pil_resize(x, (size, size), interpolation)
    if sharpening > 0:
        x = contrast_adaptive_sharpening(x, sharpening)
    return _hwc(x)


def reference_tiles(image: torch.Tensor, sharpening: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tiles [n * B, 256, 256, C], masks [n, H', W'])``: a near-square reference cropped square and cut 2 x 2; a
    tall or wide one resized to 256 on its short side and cut into overlapping 256 px tiles along the long side (at
    most 4: a longer one is centre-cropped to 4 tiles), so that no border is lost to the encoder's centre crop. Each
    mask marks its tile's place in the resized reference (for placing the tile's image prompt)."""
    import torchvision.transforms as T

    x = _chw(image[..., :3].float().cpu())
    _, _, oh, ow = x.shape
    if SQUARE_RATIOS[0] < oh / ow < SQUARE_RATIOS[1]:
        x = T.CenterCrop(min(oh, ow))(x)
        size = (TILE_SIZE * 2, TILE_SIZE * 2)
    else:
        size = (int(TILE_SIZE * ow / oh), TILE_SIZE) if oh < ow else (TILE_SIZE, int(TILE_SIZE * oh / ow))
    x = _pil_resize(x, size, "LANCZOS")
    if oh / ow > MAX_TILES or oh / ow < 1 / MAX_TILES:
        x = T.CenterCrop((TILE_SIZE, TILE_SIZE * MAX_TILES) if oh < ow else (TILE_SIZE * MAX_TILES, TILE_SIZE))(x)
    if sharpening > 0:
        x = contrast_adaptive_sharpening(x, sharpening)
    _, _, h, w = x.shape
    nx, ny = math.ceil(w / TILE_SIZE), math.ceil(h / TILE_SIZE)
    over_x = max(0, (nx * TILE_SIZE - w) / (nx - 1 if nx > 1 else 1))
    over_y = max(0, (ny * TILE_SIZE - h) / (ny - 1 if ny > 1 else 1))
    tiles, masks = [], []
    for ty in range(ny):
        for tx in range(nx):
            sx, sy = int(tx * (TILE_SIZE - over_x)), int(ty * (TILE_SIZE - over_y))
            tiles.append(x[:, :, sy:sy + TILE_SIZE, sx:sx + TILE_SIZE])
            m = torch.zeros(h, w)
            m[sy:sy + TILE_SIZE, sx:sx + TILE_SIZE] = 1.0
            masks.append(m)
    return _hwc(torch.cat(tiles)), torch.stack(masks)
