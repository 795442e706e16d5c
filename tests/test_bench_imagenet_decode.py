"""make bench's ImageNet decode section (benchmarks/loader_throughput.py ``imagenet_decode``):
runs end to end on a tiny set and reports per-core rates and cores per GPU under the keys the
README and runs/bench.json document. No timing is asserted (2 shared cores, interpreted FFCV)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def load_bench():
    spec = importlib.util.spec_from_file_location("loader_throughput", REPO / "benchmarks" / "loader_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imagenet_decode_reports_per_core_rates_and_cores_per_gpu(tmp_path):
    bench = load_bench()
    gpu = tmp_path / "throughput.json"              # as benchmarks/gpu_throughput.py writes it
    gpu.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "img_per_s": 1500.0, "batch": 64,
                               "precision": "bf16"}))
    r = bench.imagenet_decode(images=32, batch_size=16, epochs=1, throughput_json=gpu, folder=str(tmp_path))
    assert r["data"]["images"] == 32 and r["data"]["max_resolution"] == 500 and r["data"]["jpeg_quality"] == 90
    assert r["data"]["mean_jpeg_kb"] > 50                 # grained, not flat drawings (~30 KB)
    for crop in ("seeded", "stock"):
        for workers in ("1", "2"):
            rate, per_core = r["img_per_s"][crop][workers], r["img_per_s_per_core"][crop][workers]
            assert rate > 0 and np.isclose(per_core, rate / int(workers))
            assert r["img_per_cpu_s"][crop][workers] > 0
    assert r["gpu"]["img_per_s"] == 1500.0 and r["gpu"]["source"].startswith("measured:")
    assert np.isclose(r["cores_per_gpu"], 1500.0 / r["img_per_cpu_s"]["seeded"]["1"])
    assert np.isclose(r["cores_per_gpu_wall"], 1500.0 / r["img_per_s_per_core"]["seeded"]["1"])
    assert [p.name for p in tmp_path.iterdir()] == ["throughput.json"]      # the .beton was removed
    # without make gpu-check's figure: the stated assumption, with its source
    assumed = bench.gpu_rate(tmp_path / "missing.json")
    assert assumed["img_per_s"] == bench.ASSUMED_GPU["img_per_s"] and assumed["source"].startswith("assumed:")


def test_imagenet_like_samples_have_imagenet_shapes_and_repeat():
    data = load_bench().ImageNetLike(5)
    shapes = [data[i][0].shape for i in range(5)]
    assert shapes == [(375, 500, 3), (500, 375, 3), (375, 500, 3), (375, 500, 3), (500, 333, 3)]
    assert all(max(s[:2]) <= 500 for s in shapes)
    image, label = data[3]
    again, label2 = data[3]
    assert np.array_equal(image, again) and label == label2 == 3
