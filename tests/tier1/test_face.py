"""Face analysis on onnxruntime (models/face/) with the tiny stand-in models of devtools/tiny_onnx_faces.py.

The blob detector's boxes are exact by construction (a white square of side 3*s on the s-grid is one face whose box
is the square), so boxes, keypoints and crops are checked exactly. Parity with insightface, OpenCV and scikit-image
runs where those are importable and is skipped with the reason otherwise.
"""
import importlib.util
import logging
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed: face analysis tests skipped")
pytest.importorskip("onnx", reason="onnx not installed: the tiny ONNX face models cannot be written")

import tiny_onnx_faces as tiny  # noqa: E402

from comfyui_personalize.models import face  # noqa: E402

# (x, y, side, value): one square per detector stride, different brightness -> different scores
SQUARES = [(128, 64, 48, 255), (400, 200, 24, 255), (64, 320, 96, 220)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = str(tmp_path_factory.mktemp("insightface"))
    tiny.write_tiny_pack(r, "antelopev2", extras=True)
    return r


@pytest.fixture(scope="module")
def fa(root):
    return face.FaceAnalysis.from_pack("antelopev2", [root])


def by_x(dets, kps):
    order = np.argsort(dets[:, 0])
    return dets[order], kps[order]


def test_boxes_and_keypoints_exact(fa):
    img = tiny.squares_image(480, 640, SQUARES)
    dets, kps, size = fa.detect(img)
    assert size == 640 and len(dets) == 3
    dets, kps = by_x(dets, kps)
    for (x, y, s, _), d, k in zip(sorted(SQUARES), dets, kps):
        assert d[:4].tolist() == [x, y, x + s, y + s]
        np.testing.assert_allclose(k, tiny.expected_kps(x, y, s), atol=1e-4)
    assert np.all(dets[:, 4] > 0.5)


@pytest.mark.parametrize("scale", [0.5, 2.0, 1.25])
def test_boxes_exact_on_resized_images(fa, scale):
    """Image sizes other than the detector's: letterbox + OpenCV-style resize; boxes come back in image pixels."""
    h, w = int(480 * scale), int(640 * scale)
    sq = [(int(x * scale), int(y * scale), int(s * scale), v) for x, y, s, v in SQUARES]
    img = tiny.squares_image(h, w, sq)
    dets, kps, _ = fa.detect(img, det_sizes=[640])
    dets, _ = by_x(dets, kps)
    assert len(dets) == 3
    for (x, y, s, _), d in zip(sorted(sq), dets):
        np.testing.assert_allclose(d[:4], [x, y, x + s, y + s], atol=1e-4)


def test_blank_image_and_no_face_error(fa):
    assert len(fa.detector.detect(np.zeros((480, 640, 3), np.uint8), (640, 640))[0]) == 0
    images = torch.zeros(2, 480, 640, 3)
    images[0] = torch.from_numpy(tiny.squares_image(480, 640, SQUARES[:1])).float() / 255
    with pytest.raises(face.NoFaceError) as e:
        fa.analyze(images)
    assert e.value.image_index == 1 and e.value.det_sizes == face.DET_RETRY_SIZES
    assert "image 1" in str(e.value) and "640, 576, 512, 448, 384, 320" in str(e.value)


def test_retry_at_smaller_sizes(fa):
    """A 24-px square in a 512-px image is on the detector grid only when the image is not rescaled (det 512)."""
    img = tiny.squares_image(512, 512, [(200, 160, 24, 255)])
    for size in (640, 576):
        assert len(fa.detector.detect(img, (size, size))[0]) == 0
    dets, _, size = fa.detect(img)
    assert size == 512 and dets[0, :4].tolist() == [200, 160, 224, 184]
    emb = fa.analyze([img])
    assert emb.det_size.tolist() == [512]
    with pytest.raises(face.NoFaceError, match="640, 576"):
        fa.detect(img, det_sizes=(640, 576))


def test_selection_modes(fa):
    img = tiny.squares_image(480, 640, SQUARES)
    pick = lambda **kw: fa.analyze([img], **kw).bbox[0].tolist()  # noqa: E731
    assert pick(selection="largest") == [64, 320, 160, 416]  # the 96-px square (dimmer: lowest score)
    assert pick(selection="highest score") in ([128, 64, 176, 112], [400, 200, 424, 224])
    left_to_right = sorted([x, y, x + s, y + s] for x, y, s, _ in SQUARES)
    for i, box in enumerate(left_to_right):
        out = fa.analyze([img], selection="index", index=i)
        assert out.bbox[0].tolist() == box and out.face_index.tolist() == [i]
    with pytest.raises(face.FaceAnalysisError, match="has 3 face.*index 3 does not exist"):
        fa.analyze([img], selection="index", index=3)
    with pytest.raises(face.FaceAnalysisError, match="unknown face selection"):
        fa.analyze([img], selection="biggest")


def test_highest_score_picks_the_brighter_face(fa):
    img = tiny.squares_image(480, 640, [(64, 320, 96, 230), (400, 208, 48, 255)])
    assert fa.analyze([img], selection="highest score").bbox[0].tolist() == [400, 208, 448, 256]
    assert fa.analyze([img], selection="largest").bbox[0].tolist() == [64, 320, 160, 416]


def test_crop_is_the_square(fa):
    """The blob's keypoints are the ArcFace template scaled into its box, so the aligned crop at size S is the
    square itself resampled by S/side: at S = side it is the square's pixels, exactly."""
    rng = np.random.default_rng(0)
    img = tiny.squares_image(480, 640, [(64, 320, 96, 0)])
    texture = rng.integers(200, 256, (96, 96, 3), dtype=np.uint8)
    img[320:416, 64:160] = texture
    emb = fa.analyze([img], crop_size=96)
    np.testing.assert_array_equal((emb.crops[0] * 255).round().to(torch.uint8).numpy(), texture)
    for size in face.CROP_SIZES:
        crop = fa.analyze([img], crop_size=size).crops
        assert crop.shape == (1, size, size, 3) and crop.dtype == torch.float32
        assert 0 <= crop.min() and crop.max() <= 1


@pytest.mark.parametrize("size", [112, 224, 256, 336, 100])
def test_alignment_maps_keypoints_to_template(size):
    kps = tiny.expected_kps(37.0, 51.0, 60.0)
    m = face.alignment_matrix(kps, size)
    mapped = kps @ m[:, :2].T + m[:, 2]
    np.testing.assert_allclose(mapped, face.alignment_template(size), atol=1e-3)
    if size == 256:  # insightface's 128-template rule for sizes divisible by 128 only
        np.testing.assert_allclose(face.alignment_template(256)[0], face.ARCFACE_TEMPLATE[0] * 2 + [16, 0], atol=1e-4)
    with pytest.raises(face.FaceAnalysisError, match="too small"):
        face.alignment_template(8)


def _tiny_embedding(crop112, mean, std, seed=0):
    """The tiny recognizer in numpy: AveragePool(14) -> Flatten -> Gemm with its seeded weights."""
    rng = np.random.RandomState(seed)
    weight = (rng.standard_normal((512, 192)) / np.sqrt(192)).astype(np.float32)
    bias = (rng.standard_normal(512) * 0.1).astype(np.float32)
    x = (crop112.astype(np.float32) - mean) / std
    pooled = x.transpose(2, 0, 1).reshape(3, 8, 14, 8, 14).mean(axis=(2, 4)).reshape(-1)
    return weight @ pooled + bias


def test_face_embeds_contents(fa):
    rng = np.random.default_rng(1)
    imgs = []
    for _ in range(2):
        img = tiny.squares_image(480, 640, SQUARES)
        img[64:112, 128:176] = rng.integers(200, 256, (48, 48, 3), dtype=np.uint8)
        imgs.append(img)
    images = torch.from_numpy(np.stack(imgs)).float() / 255
    emb = fa.analyze(images, selection="index", index=1, crop_size=224)
    assert len(emb) == 2 and emb.crop_size == 224 and emb.pack == "antelopev2"
    shapes = {"embedding": (2, 512), "normed": (2, 512), "kps": (2, 5, 2), "bbox": (2, 4), "det_score": (2,),
              "crops": (2, 224, 224, 3)}
    for name, shape in shapes.items():
        t = getattr(emb, name)
        assert tuple(t.shape) == shape and t.dtype == torch.float32, name
    torch.testing.assert_close(emb.normed, emb.embedding / emb.embedding.norm(dim=1, keepdim=True))
    torch.testing.assert_close(emb.normed.norm(dim=1), torch.ones(2))
    assert not torch.allclose(emb.embedding[0], emb.embedding[1])  # content dependent
    assert [len(f) for f in emb.faces] == [3, 3] and emb.face_index.tolist() == [1, 1]
    for i in range(2):
        crop112 = face.norm_crop(imgs[i], emb.kps[i].numpy(), 112)
        np.testing.assert_allclose(emb.embedding[i].numpy(), _tiny_embedding(crop112, 127.5, 127.5), rtol=1e-4, atol=1e-4)
        crop224 = face.norm_crop(imgs[i], emb.kps[i].numpy(), 224)
        torch.testing.assert_close(emb.crops[i], torch.from_numpy(crop224).float() / 255)
    with pytest.raises(face.FaceAnalysisError, match="FaceEmbeds.normed has shape"):
        face.FaceEmbeds(emb.embedding, emb.normed[:1], emb.kps, emb.bbox, emb.det_score, emb.crops, 224)


def test_mxnet_recognizer_takes_raw_pixels(tmp_path):
    folder = tiny.write_tiny_pack(str(tmp_path), "buffalo_l", mxnet_names=True)
    fa = face.FaceAnalysis.from_pack("buffalo_l", [str(tmp_path)])
    assert (fa.recognizer.mean, fa.recognizer.std) == (0.0, 1.0)
    import onnx
    path = os.path.join(folder, "w600k_r50.onnx")
    assert face.onnx_node_names(path) == [n.name for n in onnx.load(path).graph.node[:8]]
    img = tiny.squares_image(480, 640, SQUARES[:1])
    emb = fa.analyze([img])
    crop = face.norm_crop(img, emb.kps[0].numpy(), 112)
    np.testing.assert_allclose(emb.embedding[0].numpy(), _tiny_embedding(crop, 0.0, 1.0), rtol=1e-4, atol=1e-3)


def test_batched_detector_outputs(tmp_path, fa):
    tiny.write_tiny_pack(str(tmp_path), "antelopev2", batched=True)
    batched = face.FaceAnalysis.from_pack("antelopev2", [str(tmp_path)])
    assert batched.detector.batched
    img = tiny.squares_image(480, 640, SQUARES)
    a, b = fa.detect(img), batched.detect(img)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_routing_skips_auxiliary_models(root, tmp_path):
    import onnx
    folder = os.path.join(str(tmp_path), "models", "mypack")
    os.makedirs(folder)
    # unknown names: routed by I/O (the landmark-shaped file sorts first and must not be taken for anything)
    onnx.save(tiny.aux_model(192, 212), os.path.join(folder, "a_landmarks.onnx"))
    onnx.save(tiny.tiny_recognizer(), os.path.join(folder, "b_rec.onnx"))
    onnx.save(tiny.blob_detector(), os.path.join(folder, "c_det.onnx"))
    fa = face.FaceAnalysis.from_pack("mypack", [str(tmp_path)])
    assert os.path.basename(fa.detector.path) == "c_det.onnx" and os.path.basename(fa.recognizer.path) == "b_rec.onnx"
    sess = face.create_session(os.path.join(folder, "a_landmarks.onnx"))
    assert face.route_model(sess) == "landmark"
    assert face.route_model(face.create_session(os.path.join(root, "models", "antelopev2", "genderage.onnx"))) == "attribute"
    assert face.list_model_packs([str(tmp_path)]) == ["mypack"]


def test_pack_folder_without_models_level(tmp_path):
    tiny.write_tiny_pack(str(tmp_path), "antelopev2")
    os.rename(os.path.join(str(tmp_path), "models", "antelopev2"), os.path.join(str(tmp_path), "antelopev2"))
    assert face.find_model_pack("antelopev2", [str(tmp_path)]) == os.path.join(str(tmp_path), "antelopev2")


def test_errors_nested_missing_incomplete(tmp_path):
    nested = tmp_path / "nested"
    tiny.write_tiny_pack(str(nested), "antelopev2", nested=True)
    with pytest.raises(face.FaceAnalysisError, match="nested one folder too deep") as e:
        face.FaceAnalysis.from_pack("antelopev2", [str(nested)])
    assert os.path.join("antelopev2", "antelopev2") in str(e.value) and "Move them up one level" in str(e.value)

    with pytest.raises(face.FaceAnalysisError) as e:
        face.find_model_pack("antelopev2", [str(tmp_path / "empty")])
    msg = str(e.value)
    assert "scrfd_10g_bnkps.onnx" in msg and "glintr100.onnx" in msg
    assert os.path.join(str(tmp_path / "empty"), "models", "antelopev2") in msg

    folder = tiny.write_tiny_pack(str(tmp_path / "half"), "buffalo_l")
    os.remove(os.path.join(folder, "w600k_r50.onnx"))
    with pytest.raises(face.FaceAnalysisError, match=r"no recognition \(w600k_r50.onnx\) model.*det_10g.onnx"):
        face.FaceAnalysis.from_pack("buffalo_l", [str(tmp_path / "half")])

    folder = tiny.write_tiny_pack(str(tmp_path / "corrupt"), "buffalo_l")
    with open(os.path.join(folder, "det_10g.onnx"), "wb") as f:
        f.write(b"not an onnx file")
    with pytest.raises(face.FaceAnalysisError, match="could not load.*det_10g.onnx.*download it again"):
        face.FaceAnalysis.from_pack("buffalo_l", [str(tmp_path / "corrupt")])


def test_bad_inputs(fa):
    with pytest.raises(face.FaceAnalysisError, match="IMAGE batch"):
        fa.analyze(torch.zeros(480, 640, 3))
    with pytest.raises(face.FaceAnalysisError, match="empty"):
        fa.analyze([])
    with pytest.raises(face.FaceAnalysisError, match="crop size 4"):
        fa.analyze([np.zeros((64, 64, 3), np.uint8)], crop_size=4)
    with pytest.raises(face.FaceAnalysisError, match="unknown provider"):
        face.session_providers("TPU", ["CPUExecutionProvider"])


def test_provider_fallback(root, caplog):
    path = os.path.join(root, "models", "antelopev2", "glintr100.onnx")
    assert face.session_providers("CPU", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert face.session_providers("CUDA", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == \
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
    import onnxruntime
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with caplog.at_level(logging.INFO, logger="personalize"):
            session = face.create_session(path, "CUDA")
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert "CUDAExecutionProvider requested" in caplog.text and "onnxruntime-gpu" in caplog.text
        assert "runs on CPUExecutionProvider" in caplog.text


def test_provider_failing_at_session_creation_is_reported(monkeypatch, caplog, root):
    """onnxruntime-gpu lists CUDA even without CUDA libraries, then silently runs on CPU: we say so."""
    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            self.requested = providers

        def get_providers(self):
            return ["CPUExecutionProvider"]

    fake = types.SimpleNamespace(InferenceSession=Session, SessionOptions=lambda: types.SimpleNamespace(),
                                 get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(face.runtime, "import_onnxruntime", lambda: fake)  # looked up by runtime.create_session
    with caplog.at_level(logging.WARNING, logger="personalize"):
        s = face.create_session("x.onnx", "CUDA")
    assert s.requested == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert "could not be initialised" in caplog.text and "fell back to CPUExecutionProvider" in caplog.text


def test_missing_onnxruntime_says_what_to_install(monkeypatch, root):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(face.OnnxRuntimeMissing, match="pip install onnxruntime.*onnxruntime-gpu"):
        face.FaceAnalysis.from_pack("antelopev2", [root])


def test_module_imports_without_onnxruntime():
    code = ("import sys; sys.modules['onnxruntime'] = None; sys.modules['onnx'] = None; sys.modules['cv2'] = None\n"
            f"sys.path.insert(0, {os.path.join(os.path.dirname(os.path.dirname(__file__)), '..', 'devtools')!r})\n"
            "import pack_alias; pack_alias.register()\n"
            "from comfyui_personalize.models import face\n"
            "assert face.PROVIDERS and 'onnxruntime' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------------------
# image operations


def test_resize_and_warp_basics():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    np.testing.assert_array_equal(face.resize_linear(img, 60, 40), img)
    area = img.reshape(20, 2, 30, 2, 3).astype(np.int32).sum(axis=(1, 3))
    np.testing.assert_array_equal(face.resize_linear(img, 30, 20), ((area + 2) >> 2).astype(np.uint8))
    ref = torch.nn.functional.interpolate(torch.from_numpy(img).permute(2, 0, 1)[None].float(), size=(53, 71),
                                          mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(face.resize_linear(img, 71, 53).astype(np.float32) - ref).max() <= 1.0
    shift = np.array([[1.0, 0, -5], [0, 1.0, -7]])  # dst(x, y) = src(x + 5, y + 7)
    np.testing.assert_array_equal(face.warp_affine(img, shift, 30), img[7:37, 5:35])


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV not installed: bit-exact check skipped")
def test_resize_and_warp_equal_opencv():
    import cv2
    rng = np.random.default_rng(1)
    for _ in range(20):
        h, w = rng.integers(20, 500, 2)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        dw, dh = (int(v) for v in rng.integers(10, 700, 2))
        np.testing.assert_array_equal(face.resize_linear(img, dw, dh), cv2.resize(img, (dw, dh)))
        kps = tiny.expected_kps(*rng.uniform(0, min(h, w) / 2, 2), rng.uniform(20, 200)) + rng.normal(0, 2, (5, 2)).astype(np.float32)
        for size in (112, 224, 256, 336, 100):
            m = face.alignment_matrix(kps, size)
            ref = cv2.warpAffine(img, m, (size, size), borderValue=0.0)
            np.testing.assert_array_equal(face.warp_affine(img, m, size), ref)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="scikit-image not installed: check skipped")
def test_similarity_equals_scikit_image():
    import warnings

    from skimage.transform import SimilarityTransform
    rng = np.random.default_rng(2)
    for _ in range(200):
        kps = (tiny.expected_kps(*rng.uniform(0, 500, 2), rng.uniform(20, 300))
               + rng.normal(0, 3, (5, 2))).astype(np.float32)
        for size in (112, 256):
            t = SimilarityTransform()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t.estimate(kps, face.alignment_template(size))
            np.testing.assert_array_equal(face.alignment_matrix(kps, size), t.params[0:2, :])


# ---------------------------------------------------------------------------------------------------------------
# parity with insightface


def _insightface_reason():
    if importlib.util.find_spec("insightface") is None:
        return "insightface not installed: parity with insightface.app.FaceAnalysis skipped"
    return None


@pytest.mark.skipif(_insightface_reason() is not None, reason=str(_insightface_reason()))
@pytest.mark.parametrize("shape", [(480, 640), (600, 800), (240, 320), (960, 1280), (800, 600), (520, 700)])
def test_parity_with_insightface(root, fa, shape):
    """Textured squares on a textured background; every shape but 480x640 goes through the letterbox resize."""
    import warnings

    from insightface.app import FaceAnalysis
    from insightface.utils import face_align
    rng = np.random.default_rng(shape[0])
    h, w = shape
    img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)  # dark textured background
    scale = max(h, w) / 640  # squares land on the detector grid after the letterbox resize (not for 520x700)
    for x, y, s, v in SQUARES:
        x, y, s = int(x * scale), int(y * scale), int(s * scale)
        img[y:y + s, x:x + s] = rng.integers(v - 30, v + 1, (s, s, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = FaceAnalysis(name="antelopev2", root=root, providers=["CPUExecutionProvider"],
                           allowed_modules=["detection", "recognition"])
        app.prepare(ctx_id=-1, det_size=(640, 640))
        ref = app.get(np.ascontiguousarray(img[..., ::-1]))  # insightface takes BGR
        assert ref, "insightface found no face: the test picture is wrong"
        dets, kps = fa.detector.detect(img, (640, 640))
        assert len(dets) == len(ref)
        for d, k, r in zip(dets, kps, ref):
            np.testing.assert_array_equal(d[:4], r.bbox)
            np.testing.assert_array_equal(d[4], r.det_score)
            np.testing.assert_array_equal(k, r.kps)
            np.testing.assert_array_equal(fa.recognizer.embed(img, k), r.embedding)
            for size in (112, 224, 256, 336):
                np.testing.assert_array_equal(face.norm_crop(img, k, size),
                                              face_align.norm_crop(img[..., ::-1], r.kps, size)[..., ::-1])
        ours = fa.analyze([img], selection="highest score")
        np.testing.assert_array_equal(ours.normed[0].numpy(), ref[0].normed_embedding)
