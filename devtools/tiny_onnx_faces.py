"""Stand-in ONNX models for the insightface packs (tests and benches; no real weights anywhere).

Tiny models (the inputs and outputs of insightface's ``model_zoo`` SCRFD / ArcFaceONNX), written with ``onnx.helper``
(opset 13), byte-deterministic:
- ``blob_detector``: same signature as SCRFD-10G with keypoints (input ``[1, 3, ?, ?]``, 9 outputs
  ``score/bbox/kps`` at strides 8, 16, 32, 2 anchors, 2-D outputs). It finds bright squares on a dark background:
  per stride s the grey image is averaged into s x s cells; a location scores ``sigmoid(GAIN * (mean of the 3x3
  cells - mean of the 16 ring cells around them - OFFSET))``. A white square of side 3*s whose corner lies on the
  s-grid (in detector pixels) gives exactly one face: box == the square, keypoints == the ArcFace template points
  scaled into the box (:func:`expected_kps`), at stride s only.
- ``tiny_recognizer``: same signature as glintr100 / w600k_r50 (``[None, 3, 112, 112] -> [None, 512]``):
  AveragePool(14) -> Flatten(192) -> Gemm(512) with seeded weights: deterministic and content dependent.
- ``aux_model``: landmark (192 px) / gender-age (96 px) shaped models, to check they are routed and skipped.

Real-size random-weight models for the bench (``--bench``): iResNet100 (glintr100's architecture, ~65 M parameters,
~261 MB) and an SCRFD-10G-like detector (ResNet basic-block backbone with the SCRFD-10G stage widths, PAFPN neck,
3 x conv3x3 heads with 80 channels; the exact mmdet model is not rebuilt here, its size and FLOPs are close).

    python devtools/tiny_onnx_faces.py ROOT [--name antelopev2] [--extras] [--bench]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

OPSET = 13
IR_VERSION = 8
STRIDES = (8, 16, 32)
ANCHORS = 2
GAIN, OFFSET = 8.0, 1.5  # blob score: sigmoid(8 * (centre - ring - 1.5)); a white square scores ~0.98
BOX_CELLS = (1.0, 1.0, 2.0, 2.0)  # l, t, r, b in stride units from the anchor centre (top-left of the middle cell)
# ArcFace template (insightface arcface_dst) in a 112 crop: the blob's keypoints are these, scaled into its box.
ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                             [70.7299, 92.2041]], dtype=np.float32)
PACK_FILES = {
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
}


def _onnx():
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:  # pragma: no cover
        raise ImportError("writing the stand-in ONNX models needs the onnx package: pip install onnx") from e
    return onnx, TensorProto, helper, numpy_helper


def _model(graph, producer="comfyui-personalize tiny_onnx_faces"):
    onnx, _, helper, _ = _onnx()
    model = helper.make_model(graph, producer_name=producer, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _const(name, array):
    _, _, _, numpy_helper = _onnx()
    return numpy_helper.from_array(np.asarray(array), name)


# ---------------------------------------------------------------------------------------------------------------
# tiny models


def expected_kps(x: float, y: float, side: float) -> np.ndarray:
    """Keypoints the blob detector gives for a square at (x, y) of side ``side`` (image pixels)."""
    return np.array([x, y], np.float32) + ARCFACE_TEMPLATE / np.float32(112) * np.float32(side)


def blob_detector(batched: bool = False, static_size: tuple[int, int] | None = None):
    """SCRFD-signature blob detector (see the module docstring). ``batched`` gives 3-D ``[1, N, k]`` outputs;
    ``static_size`` (width, height) fixes the input size."""
    _, TP, helper, _ = _onnx()
    h, w = (static_size[1], static_size[0]) if static_size else ("?", "?")
    inputs = [helper.make_tensor_value_info("input.1", TP.FLOAT, [1, 3, h, w])]
    nodes, inits = [], []
    kps_units = (ARCFACE_TEMPLATE / 112.0 * 3.0 - 1.0).reshape(1, 10)  # template in the 3-cell box, from the anchor
    inits += [_const("zero", np.float32(0)), _const("box_units", np.array([BOX_CELLS], np.float32)),
              _const("kps_units", kps_units.astype(np.float32)), _const("col", np.array([-1, 1], np.int64)),
              _const("gain", np.float32(GAIN)), _const("offset", np.float32(OFFSET)),
              _const("k25", np.float32(25.0 / 16.0)), _const("k9", np.float32(9.0 / 16.0))]
    nodes.append(helper.make_node("ReduceMean", ["input.1"], ["grey"], axes=[1], keepdims=1, name="grey"))
    outs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        p = f"s{s}_"
        nodes += [
            helper.make_node("AveragePool", ["grey"], [p + "cells"], kernel_shape=[s, s], strides=[s, s], name=p + "cells"),
            helper.make_node("AveragePool", [p + "cells"], [p + "m3"], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                             count_include_pad=1, name=p + "m3"),
            helper.make_node("AveragePool", [p + "cells"], [p + "m5"], kernel_shape=[5, 5], pads=[2, 2, 2, 2],
                             count_include_pad=1, name=p + "m5"),
            # ring mean = (25 * m5 - 9 * m3) / 16
            helper.make_node("Mul", [p + "m5", "k25"], [p + "a"], name=p + "a"),
            helper.make_node("Mul", [p + "m3", "k9"], [p + "b"], name=p + "b"),
            helper.make_node("Sub", [p + "a", p + "b"], [p + "ring"], name=p + "ring"),
            helper.make_node("Sub", [p + "m3", p + "ring"], [p + "d"], name=p + "d"),
            helper.make_node("Sub", [p + "d", "offset"], [p + "e"], name=p + "e"),
            helper.make_node("Mul", [p + "e", "gain"], [p + "z"], name=p + "z"),
            helper.make_node("Sigmoid", [p + "z"], [p + "sig"], name=p + "sig"),
            helper.make_node("Transpose", [p + "sig"], [p + "t"], perm=[0, 2, 3, 1], name=p + "t"),
            helper.make_node("Reshape", [p + "t", "col"], [p + "loc"], name=p + "loc"),
            helper.make_node("Concat", [p + "loc"] * ANCHORS, [p + "anc"], axis=1, name=p + "anc"),
            helper.make_node("Reshape", [p + "anc", "col"], [p + "score"], name=p + "score"),
            helper.make_node("Mul", [p + "score", "zero"], [p + "z0"], name=p + "z0"),
            helper.make_node("Add", [p + "z0", "box_units"], [p + "bbox"], name=p + "bbox"),
            helper.make_node("Add", [p + "z0", "kps_units"], [p + "kps"], name=p + "kps"),
        ]
        for kind in outs:
            outs[kind].append(p + kind)
    outputs = []
    width = {"score": 1, "bbox": 4, "kps": 10}
    for kind in ("score", "bbox", "kps"):
        for s, name in zip(STRIDES, outs[kind]):
            out = f"{kind}_{s}"
            if batched:
                nodes.append(helper.make_node("Unsqueeze", [name, "axis0"], [out], name=out))
                outputs.append(helper.make_tensor_value_info(out, TP.FLOAT, [1, None, width[kind]]))
            else:
                nodes.append(helper.make_node("Identity", [name], [out], name=out))
                outputs.append(helper.make_tensor_value_info(out, TP.FLOAT, [None, width[kind]]))
    if batched:
        inits.append(_const("axis0", np.array([0], np.int64)))
    return _model(helper.make_graph(nodes, "blob_detector", inputs, outputs, inits))


def tiny_recognizer(seed: int = 0, mxnet_names: bool = False, size: int = 112):
    """ArcFace-signature recognizer: AveragePool(size/8) -> Flatten -> Gemm(192 -> 512), seeded weights.
    ``mxnet_names`` names the first nodes like an mxnet conversion (Sub / Mul), which switches insightface's
    pre-processing to mean 0, std 1."""
    _, TP, helper, _ = _onnx()
    rng = np.random.RandomState(seed)
    weight = (rng.standard_normal((512, 192)) / np.sqrt(192)).astype(np.float32)
    bias = (rng.standard_normal(512) * 0.1).astype(np.float32)
    inputs = [helper.make_tensor_value_info("input.1", TP.FLOAT, ["None", 3, size, size])]
    nodes, x = [], "input.1"
    inits = [_const("fc.weight", weight), _const("fc.bias", bias)]
    if mxnet_names:
        inits += [_const("minus_val", np.float32(0.0)), _const("mul_val", np.float32(1.0))]
        nodes += [helper.make_node("Sub", [x, "minus_val"], ["x_sub"], name="_minusscalar0"),
                  helper.make_node("Mul", ["x_sub", "mul_val"], ["x_mul"], name="_mulscalar0")]
        x = "x_mul"
    k = size // 8
    nodes += [helper.make_node("AveragePool", [x], ["pooled"], kernel_shape=[k, k], strides=[k, k], name="/pool/AveragePool"),
              helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="/Flatten"),
              helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["embedding"], transB=1, name="/fc/Gemm")]
    outputs = [helper.make_tensor_value_info("embedding", TP.FLOAT, ["None", 512])]
    return _model(helper.make_graph(nodes, "tiny_recognizer", inputs, outputs, inits))


def aux_model(size: int, out_dim: int):
    """A landmark (192 px, 212 outputs) or gender/age (96 px, 3 outputs) shaped model: routed, never used."""
    _, TP, helper, _ = _onnx()
    inputs = [helper.make_tensor_value_info("data", TP.FLOAT, ["None", 3, size, size])]
    k = size // 2
    nodes = [helper.make_node("AveragePool", ["data"], ["p"], kernel_shape=[k, k], strides=[k, k], name="pool"),
             helper.make_node("Flatten", ["p"], ["f"], axis=1, name="flat"),
             helper.make_node("Gemm", ["f", "w"], ["fc1"], transB=1, name="fc")]
    inits = [_const("w", np.ones((out_dim, 12), np.float32))]
    outputs = [helper.make_tensor_value_info("fc1", TP.FLOAT, ["None", out_dim])]
    return _model(helper.make_graph(nodes, "aux", inputs, outputs, inits))


def write_tiny_pack(root: str, name: str = "antelopev2", *, extras: bool = False, batched: bool = False,
                    mxnet_names: bool = False, seed: int = 0, nested: bool = False) -> str:
    """Write a tiny pack as insightface lays it out: ``<root>/models/<name>/<detector>.onnx, <recognizer>.onnx``
    (file names of the real pack; ``extras`` adds 2d106det.onnx / genderage.onnx stand-ins). ``nested`` writes the
    common broken layout ``<root>/models/<name>/<name>/*.onnx``. Returns the folder holding the files."""
    onnx = _onnx()[0]
    det_file, rec_file = PACK_FILES.get(name, ("det.onnx", "rec.onnx"))
    folder = os.path.join(root, "models", name, *((name,) if nested else ()))
    os.makedirs(folder, exist_ok=True)
    models = {det_file: blob_detector(batched=batched), rec_file: tiny_recognizer(seed, mxnet_names=mxnet_names)}
    if extras:
        models.update({"2d106det.onnx": aux_model(192, 212), "genderage.onnx": aux_model(96, 3)})
    for file, model in models.items():
        onnx.save(model, os.path.join(folder, file))
    return folder


def squares_image(height: int, width: int, squares, background: int = 0) -> np.ndarray:
    """RGB uint8 test picture: ``squares`` = [(x, y, side, value)], value 255 = white."""
    img = np.full((height, width, 3), background, np.uint8)
    for x, y, side, value in squares:
        img[y:y + side, x:x + side] = value
    return img


# ---------------------------------------------------------------------------------------------------------------
# real-size random-weight models (bench)


class _GraphBuilder:
    def __init__(self, seed: int):
        self.nodes, self.inits, self.rng, self.count, self.params = [], [], np.random.RandomState(seed), 0, 0

    def _name(self, kind):
        self.count += 1
        return f"{kind}_{self.count}"

    def weight(self, shape, scale=None):
        name = self._name("w")
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        arr = (self.rng.standard_normal(shape) * (scale if scale is not None else np.sqrt(2.0 / fan_in))).astype(np.float32)
        self.inits.append(_const(name, arr))
        self.params += arr.size
        return name

    def node(self, op, inputs, **attrs):
        _, _, helper, _ = _onnx()
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name="/" + out, **attrs))
        return out

    def conv(self, x, cin, cout, k=3, stride=1, bias=True):
        ins = [x, self.weight((cout, cin, k, k))]
        if bias:
            ins.append(self.weight((cout,), scale=0.01))
        return self.node("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)

    def bn(self, x, c):
        scale, b = self.weight((c,), 0.1), self.weight((c,), 0.01)
        mean = self.weight((c,), 0.01)
        var = _const(self._name("var"), np.ones(c, np.float32))
        self.inits.append(var)
        self.params += c
        return self.node("BatchNormalization", [x, scale, b, mean, var.name], epsilon=1e-5)

    def prelu(self, x, c):
        return self.node("PRelu", [x, self.weight((c, 1, 1), 0.25)])


def iresnet100(seed: int = 0, layers=(3, 13, 30, 3)):
    """Random-weight iResNet100 (arcface_torch ``iresnet.py`` architecture of glintr100): 112 px -> 512."""
    _, TP, helper, _ = _onnx()
    g = _GraphBuilder(seed)
    x = g.prelu(g.bn(g.conv("input.1", 3, 64, bias=False), 64), 64)
    cin = 64
    for planes, blocks in zip((64, 128, 256, 512), layers):
        for i in range(blocks):
            stride = 2 if i == 0 else 1
            y = g.bn(x, cin)
            y = g.prelu(g.bn(g.conv(y, cin, planes, bias=False), planes), planes)
            y = g.bn(g.conv(y, planes, planes, stride=stride, bias=False), planes)
            short = x if (stride == 1 and cin == planes) else g.bn(g.conv(x, cin, planes, k=1, stride=stride, bias=False), planes)
            x, cin = g.node("Add", [y, short]), planes
    x = g.node("Flatten", [g.bn(x, 512)], axis=1)
    x = g.node("Gemm", [x, g.weight((512, 512 * 7 * 7), 0.01), g.weight((512,), 0.01)], transB=1)
    x = g.bn(g.node("Unsqueeze", [x, _axes(g, [2, 3])]), 512)
    out = g.node("Flatten", [x], axis=1)
    g.nodes.append(helper.make_node("Identity", [out], ["embedding"], name="/out"))
    graph = helper.make_graph(g.nodes, "iresnet100", [helper.make_tensor_value_info("input.1", TP.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TP.FLOAT, ["None", 512])], g.inits)
    return _model(graph), g.params


def _axes(g, axes):
    c = _const(g._name("axes"), np.array(axes, np.int64))
    g.inits.append(c)
    return c.name


def scrfd_like(seed: int = 0):
    """Random-weight SCRFD-10G-like detector, 9 outputs (strides 8/16/32, 2 anchors, keypoints)."""
    _, TP, helper, _ = _onnx()
    g = _GraphBuilder(seed)
    relu = lambda t: g.node("Relu", [t])  # noqa: E731
    x = relu(g.conv("input.1", 3, 28, stride=2))
    x = relu(g.conv(x, 28, 28))
    x = relu(g.conv(x, 28, 56))
    x = g.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    cin, feats = 56, []
    for planes, blocks, stride in ((56, 3, 1), (88, 4, 2), (88, 2, 2), (224, 3, 2)):
        for i in range(blocks):
            s = stride if i == 0 else 1
            y = relu(g.conv(x, cin, planes, stride=s))
            y = g.conv(y, planes, planes)
            short = x if (s == 1 and cin == planes) else g.conv(x, cin, planes, k=1, stride=s)
            x, cin = relu(g.node("Add", [y, short])), planes
        feats.append((x, cin))
    lat = [g.conv(f, c, 56, k=1) for f, c in feats[1:]]  # strides 8, 16, 32
    for i in (1, 0):  # top-down
        up = g.node("Resize", [lat[i + 1], "", _scales(g)], mode="nearest")
        lat[i] = g.node("Add", [lat[i], up])
    outs = [g.conv(t, 56, 56) for t in lat]
    for i in (1, 2):  # bottom-up (PAFPN)
        outs[i] = g.node("Add", [outs[i], g.conv(outs[i - 1], 56, 56, stride=2)])
    heads = {"score": [], "bbox": [], "kps": []}
    for t in outs:
        y = t
        for j in range(3):
            y = relu(g.conv(y, 56 if j == 0 else 80, 80))
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            o = g.conv(y, 80, ANCHORS * width)
            o = g.node("Reshape", [g.node("Transpose", [o], perm=[0, 2, 3, 1]), _shape(g, [-1, width])])
            heads[kind].append(g.node("Sigmoid", [o]) if kind == "score" else o)
    outputs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for s, name in zip(STRIDES, heads[kind]):
            g.nodes.append(helper.make_node("Identity", [name], [f"{kind}_{s}"], name=f"/{kind}_{s}"))
            outputs.append(helper.make_tensor_value_info(f"{kind}_{s}", TP.FLOAT, [None, width]))
    graph = helper.make_graph(g.nodes, "scrfd_like", [helper.make_tensor_value_info("input.1", TP.FLOAT, [1, 3, "?", "?"])],
                              outputs, g.inits)
    return _model(graph), g.params


def _scales(g):
    c = _const(g._name("scales"), np.array([1, 1, 2, 2], np.float32))
    g.inits.append(c)
    return c.name


def _shape(g, shape):
    c = _const(g._name("shape"), np.array(shape, np.int64))
    g.inits.append(c)
    return c.name


def write_bench_pack(root: str, name: str = "antelopev2", seed: int = 0) -> dict:
    """Real-size random-weight pack: ``<root>/models/<name>/`` with the SCRFD-like detector and iResNet100."""
    onnx = _onnx()[0]
    det_file, rec_file = PACK_FILES.get(name, ("det.onnx", "rec.onnx"))
    folder = os.path.join(root, "models", name)
    os.makedirs(folder, exist_ok=True)
    info = {"folder": folder}
    for file, (model, params) in ((det_file, scrfd_like(seed)), (rec_file, iresnet100(seed))):
        path = os.path.join(folder, file)
        onnx.save(model, path)
        info[file] = {"params": params, "bytes": os.path.getsize(path)}
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="insightface root: files go to ROOT/models/NAME/")
    ap.add_argument("--name", default="antelopev2")
    ap.add_argument("--extras", action="store_true", help="add landmark / gender-age stand-ins")
    ap.add_argument("--bench", action="store_true", help="real-size random-weight models instead of tiny ones")
    args = ap.parse_args(argv)
    if args.bench:
        print(write_bench_pack(args.root, args.name))
    else:
        print(write_tiny_pack(args.root, args.name, extras=args.extras))


if __name__ == "__main__":
    sys.exit(main())
