"""Face-analysis latency on CPU with real-size random-weight models, and the import cost of onnxruntime.

- Writes a random-weight pack (devtools/tiny_onnx_faces.py --bench: iResNet100 = glintr100's architecture, and an
  SCRFD-10G-like detector) into a temporary insightface folder, loads it with models/face/ and times, per image:
  detection at 640 (network alone and with decoding + NMS), alignment (112 crop), recognition.
  Random weights: the detector's scores are meaningless, so recognition runs on fixed keypoints.
- Times ``import models.face`` in fresh interpreters (torch and numpy already imported, as inside ComfyUI) with
  onnxruntime importable and with it blocked, and ``import onnxruntime`` / ``import insightface`` for comparison.

    python bench/face_latency.py [--images 3] [--repeats 5] [--skip-latency]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "devtools"))

import pack_alias  # noqa: E402

pack_alias.register()


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def _import_time(statement: str, block_ort: bool, repeats: int) -> float:
    code = ("import sys, time\n"
            + ("sys.modules['onnxruntime'] = None\n" if block_ort else "")
            + f"sys.path.insert(0, {os.path.join(ROOT, 'devtools')!r})\n"
            "import pack_alias; pack_alias.register()\n"
            "import numpy, torch, PIL.Image\n"
            "t = time.perf_counter()\n"
            f"{statement}\n"
            "print(time.perf_counter() - t)\n")
    times = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if out.returncode != 0:
            return float("nan")
        times.append(float(out.stdout.strip().splitlines()[-1]) * 1000)
    return statistics.median(times)


def bench_latency(images: int, repeats: int) -> None:
    import numpy as np
    import tiny_onnx_faces as tiny

    from comfyui_personalize.models import face

    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        info = tiny.write_bench_pack(root, "antelopev2")
        print(f"random-weight pack written in {time.perf_counter() - t:.1f} s")
        for file in ("scrfd_10g_bnkps.onnx", "glintr100.onnx"):
            print(f"  {file}: {info[file]['params'] / 1e6:.2f} M parameters, {info[file]['bytes'] / 2**20:.1f} MiB")
        t = time.perf_counter()
        fa = face.FaceAnalysis.from_pack("antelopev2", [root], "CPU")
        print(f"load (two sessions): {time.perf_counter() - t:.2f} s on {fa.providers[0]}")

        rng = np.random.default_rng(0)
        pictures = [rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8) for _ in range(images)]
        kps = tiny.expected_kps(400, 200, 250)
        det = fa.detector
        blob = np.zeros((1, 3, 640, 640), np.float32)
        run_ms = _median_ms(lambda: det.session.run(det.output_names, {det.input_name: blob}), repeats)
        # threshold above 1: random weights would otherwise hand thousands of boxes to NMS
        det_ms = statistics.median(_median_ms(lambda p=p: det.detect(p, (640, 640), thresh=1.1), repeats) for p in pictures)
        align_ms = statistics.median(_median_ms(lambda p=p: face.norm_crop(p, kps, 112), repeats) for p in pictures)
        crop = face.norm_crop(pictures[0], kps, 112)
        rec_ms = _median_ms(lambda: fa.recognizer.embed_crop(crop), repeats)
        crop224_ms = _median_ms(lambda: face.norm_crop(pictures[0], kps, 224), repeats)
        total = det_ms + align_ms + rec_ms + crop224_ms
        print(f"per image (1024x768, CPU, median of {repeats}):")
        print(f"  detector network 640x640      {run_ms:8.1f} ms")
        print(f"  detection (resize+net+decode) {det_ms:8.1f} ms")
        print(f"  alignment 112 crop            {align_ms:8.1f} ms")
        print(f"  recognition iResNet100        {rec_ms:8.1f} ms")
        print(f"  224 crop for CLIP             {crop224_ms:8.1f} ms")
        print(f"  total detect + embed          {total:8.1f} ms  ({1000 / total:.2f} images/s)")


def bench_imports(repeats: int) -> None:
    with_ort = _import_time("from comfyui_personalize.models import face", False, repeats)
    without = _import_time("from comfyui_personalize.models import face", True, repeats)
    ort = _import_time("import onnxruntime", False, repeats)
    print(f"import models.face (torch already loaded), median of {repeats} fresh interpreters:")
    print(f"  onnxruntime installed   {with_ort:8.1f} ms")
    print(f"  onnxruntime blocked     {without:8.1f} ms   ratio {with_ort / without:.2f}x")
    print(f"  import onnxruntime      {ort:8.1f} ms   (paid once, when a face model is first loaded)")
    import importlib.util
    if importlib.util.find_spec("insightface") is not None:
        ins = _import_time("import insightface.app", False, repeats)
        print(f"  import insightface.app  {ins:8.1f} ms   (what packs built on insightface pay at startup; "
              f"{ins / max(with_ort, 1e-3):.0f}x models.face)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3, help="test pictures (1024x768)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args(argv)
    bench_imports(args.repeats)
    if not args.skip_latency:
        bench_latency(args.images, args.repeats)


if __name__ == "__main__":
    main()
