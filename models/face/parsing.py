"""Face parsing: BiSeNet with a ResNet-18 context path (Yu et al. 2018), 19 CelebAMask-HQ classes, in plain torch.

Parameter names are those of facexlib's ``parsing_bisenet.pth`` (facexlib ``parsing/bisenet.py`` and
``parsing/resnet.py``), so that file loads as it is. PuLID uses the parsing to keep only the face: background, neck,
clothes, hair, hat and ears become white, the rest is turned grey (ToTheBeginning/PuLID ``pulid/pipeline.py``
``get_id_embedding``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

PARSING_CLASSES = 19
# Input normalization of the parsing network (ImageNet mean / std, as PuLID's pipeline calls it).
PARSING_MEAN, PARSING_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CelebAMask-HQ labels PuLID whitens: background, neck, cloth, hair, hat, ears, earring, necklace
# (bg_label in ToTheBeginning/PuLID pulid/pipeline.py).
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
# ITU-R BT.601 luma, PuLID's to_gray.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if cin != cout or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _stage(64, 64, 1)
        self.layer2 = _stage(64, 128, 2)
        self.layer3 = _stage(128, 256, 2)
        self.layer4 = _stage(256, 512, 2)

    def forward(self, x):
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        f8 = self.layer2(x)
        f16 = self.layer3(f8)
        return f8, f16, self.layer4(f16)  # strides 8, 16, 32


def _global_pool(x):
    return F.avg_pool2d(x, x.shape[2:])


class AttentionRefinement(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, cout)
        self.conv_atten = nn.Conv2d(cout, cout, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(cout)

    def forward(self, x):
        feat = self.conv(x)
        return feat * torch.sigmoid(self.bn_atten(self.conv_atten(_global_pool(feat))))


class ContextPath(nn.Module):
    def __init__(self):
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x):
        f8, f16, f32 = self.resnet(x)
        avg = F.interpolate(self.conv_avg(_global_pool(f32)), f32.shape[2:], mode="nearest")
        up32 = self.conv_head32(F.interpolate(self.arm32(f32) + avg, f16.shape[2:], mode="nearest"))
        up16 = self.conv_head16(F.interpolate(self.arm16(f16) + up32, f8.shape[2:], mode="nearest"))
        return f8, up16, up32


class FeatureFusion(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.convblk = ConvBNReLU(cin, cout, ks=1, padding=0)
        self.conv1 = nn.Conv2d(cout, cout // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(cout // 4, cout, 1, bias=False)

    def forward(self, spatial, context):
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(_global_pool(feat)))))
        return feat * atten + feat


class Output(nn.Module):
    def __init__(self, cin: int, mid: int, classes: int):
        super().__init__()
        self.conv = ConvBNReLU(cin, mid)
        self.conv_out = nn.Conv2d(mid, classes, 1, bias=False)

    def forward(self, x):
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """``forward(x [N, 3, H, W] normalized) -> logits [N, 19, H, W]`` (the main head; the two auxiliary heads of
    training, ``conv_out16`` / ``conv_out32``, are kept so that the file's keys load, and not run)."""

    def __init__(self, classes: int = PARSING_CLASSES):
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = Output(256, 256, classes)
        self.conv_out16 = Output(128, 64, classes)
        self.conv_out32 = Output(128, 64, classes)

    def forward(self, x):
        f8, cp8, _ = self.cp(x)
        out = self.conv_out(self.ffm(f8, cp8))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


def face_only(faces: torch.Tensor, parser: nn.Module) -> torch.Tensor:
    """PuLID's face-only image: ``faces`` RGB ``[N, 3, H, W]`` in 0..1 -> white where the parsing says background,
    neck, clothes, hair, hat or ears, grey (luma) elsewhere."""
    mean = torch.tensor(PARSING_MEAN, device=faces.device, dtype=faces.dtype).view(1, 3, 1, 1)
    std = torch.tensor(PARSING_STD, device=faces.device, dtype=faces.dtype).view(1, 3, 1, 1)
    labels = parser((faces - mean) / std).argmax(dim=1, keepdim=True)
    background = torch.zeros_like(labels, dtype=torch.bool)
    for label in BACKGROUND_LABELS:
        background |= labels == label
    w = GRAY_WEIGHTS
    gray = (w[0] * faces[:, 0:1] + w[1] * faces[:, 1:2] + w[2] * faces[:, 2:3]).repeat(1, 3, 1, 1)
    return torch.where(background, torch.ones_like(faces), gray)


def load_parser(sd: dict[str, torch.Tensor]) -> BiSeNet:
    """A :class:`BiSeNet` from facexlib's ``parsing_bisenet.pth`` state dict (keys as they are)."""
    from ..checkpoints import CheckpointError, check_weights, load_exact

    if "cp.resnet.conv1.weight" not in sd:
        kind = "ParseNet (parsing_parsenet.pth)" if any(k.startswith("encoder.") for k in sd) else "not a parsing model"
        raise CheckpointError(f"expected facexlib's BiSeNet (parsing_bisenet.pth, keys cp.resnet.*); this file is {kind}")
    model = BiSeNet(int(sd["conv_out.conv_out.weight"].shape[0]) if "conv_out.conv_out.weight" in sd else PARSING_CLASSES)
    check_weights(sd)
    load_exact(model, sd, "the BiSeNet file")
    return model.eval().requires_grad_(False)
