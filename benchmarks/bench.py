"""`make bench`: the training step side by side in one process, the loader, and where the last
demo's time went; prints a table naming the machine (CPU model, ISA flags) and writes JSON.

- plain: benchmarks/plain_mae.py, a hand-written PyTorch MAE step on timm blocks (no project code)
- bare: the project's MAE method + torch AdamW on a fixed batch (no loader, no DeepSpeed)
- pipeline: the real pre-training loop (hpc_mim/train: FFCV loader on data/fmnist, DeepSpeed,
  loss terms, stop-signal agreement, progress lines), img/s of its log windows after the first,
  once per setting of ``--pipeline`` (config overrides, e.g. ``train.compile=true``)
- loader: FFCV's training loader alone (seeded crops), img/s after its first epoch
- imagenet_decode: what a GPU node needs from its CPUs: FFCV's JPEG decode + RandomResizedCrop
  224 + flip through the project's loader (seeded crops, and FFCV's stock ones) on 2,000
  ImageNet-sized JPEGs (~440x425, ~110 KB, quality 90, max side 500 as FFCV's ImageNet recipe),
  in img/s (wall clock, and per CPU-second) with 1 and 2 decoding threads, and cores per GPU =
  the MAE ViT-B/16 img/s of one GPU (``make gpu-check``'s runs/gpu_check/throughput.json, else
  a stated assumption) / the seeded images per CPU-second with one thread
  (benchmarks/loader_throughput.py ``imagenet_decode``)
- the bare step's profile (share of matmuls and attention, matmul GFLOP/s), and the plain step
  with torch, MKL and oneDNN capped at AVX2 (an estimate of a machine without AVX-512)

All on the demo's ViT (preset fmnist_tiny: 128-d, 6 blocks, 28 px, patch 4; batch 256). The
step variants alternate for ``--rounds`` rounds and each reports its median, so a machine that
slows down mid-run affects them alike: quote the ratios.

    python benchmarks/bench.py --out runs/bench.json
    python benchmarks/bench.py --imagenet-decode-only      # that section alone (~2-3 min on 2 cores),
                                                           # merged into the existing JSON
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from hpc_mim.config import load_config  # noqa: E402
from hpc_mim.methods import build_method  # noqa: E402

ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def machine() -> dict[str, object]:
    flags = set()
    model = platform.processor()
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            model = value.strip()
        elif key.strip() == "Flags":
            flags = set(value.split())
    return {"cpu": model, "cores": os.cpu_count(), "isa": [f for f in ISA if f in flags],
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def load_plain():
    spec = importlib.util.spec_from_file_location("plain_mae", REPO / "benchmarks" / "plain_mae.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(step, batch: int, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def load_loader_bench():
    """benchmarks/loader_throughput.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("loader_throughput", REPO / "benchmarks" / "loader_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def imagenet_decode(images: int, throughput_json: Path) -> dict[str, object]:
    """The ImageNet decode section: loader_throughput.imagenet_decode with the machine named
    (the per-core figure is this CPU's), printed."""
    bench = load_loader_bench()
    result = {"machine": machine(), **bench.imagenet_decode(images, throughput_json=throughput_json)}
    print(bench.format_imagenet_decode(result), flush=True)
    return result


def plain_rate(batch: int, steps: int) -> float:
    plain = load_plain()
    model, opt, images = plain.make(batch)
    return timed(lambda: plain.step(model, opt, images), batch, steps)


def bare_step(batch: int, preset: str):
    """One step of the project's MAE method with torch's default AdamW on a fixed batch (no
    loader, no DeepSpeed): a closure."""
    cfg = load_config("mae", preset)
    torch.manual_seed(0)
    method = build_method(cfg.model, cfg.method)
    opt = torch.optim.AdamW(method.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    data = {"image": torch.randn(batch, 3, method.input_size, method.input_size)}

    def step() -> None:
        loss = method(data)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bare_rate(batch: int, steps: int, preset: str) -> float:
    return timed(bare_step(batch, preset), batch, steps)


def pipeline_subprocess(preset: str, setting: str, steps: int, log_every: int) -> float:
    """``pipeline_rate`` in a fresh process: a loop stopped mid-epoch leaves FFCV's loader
    threads decoding ahead, which would slow down whatever this process measured next."""
    out = subprocess.run([sys.executable, __file__, "--one-pipeline", setting, "--preset", preset,
                          "--pipeline-steps", str(steps), "--log-every", str(log_every)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"pipeline [{setting}] failed: {out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def pipeline_rate(preset: str, overrides: list[str], steps: int, log_every: int) -> float:
    """Median img/s of the real loop's log windows, the first (warm-up, JIT) left out."""
    from hpc_mim.distributed.env import DistEnv, free_port
    from hpc_mim.rundir import RunDir
    from hpc_mim.train.trainer import Trainer
    windows: list[float] = []

    class Measured(Trainer):
        def log_metrics(self, sums, window, step, epoch, img_s):
            windows.append(img_s)
            return super().log_metrics(sums, window, step, epoch, img_s)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("mae", preset, overrides=[
            *overrides, f"train.max_steps={steps}", f"train.log_every={log_every}",
            "checkpoint.every_steps=100000", f"runs_root={tmp}", "name=bench"])
        run = RunDir(Path(tmp) / "bench").create()
        trainer = Measured(cfg, run, env=DistEnv(master_port=free_port()))
        trainer.loop(0, 0, 0, trainer.steps_per_epoch * trainer.accum)
    return statistics.median(windows[1:])


def loader_rate(preset: str, images: int) -> float:
    from hpc_mim.data.ffcv_io import build_loader, iterate
    cfg = load_config("mae", preset)
    info = cfg.dataset_info()
    loader = build_loader(info["train"], cfg.train.micro_batch_size, cfg.model.img_size, info["mean"],
                          info["std"], train=True, seed=0, crop_scale=cfg.data.crop_scale,
                          num_workers=cfg.data.num_workers, max_samples=images)
    rate = 0.0
    for epoch in range(2):                          # the first epoch pays numba's compilation
        start, n = time.perf_counter(), 0
        for batch in iterate(loader, epoch):
            n += batch["image"].shape[0]
        rate = n / (time.perf_counter() - start)
    return rate


def matmul_share(batch: int, preset: str) -> dict[str, float]:
    """Where the bare eager step's time goes (torch profiler, 3 steps): the share in matmuls
    (mm, addmm, bmm) and in attention, and the matmuls' achieved GFLOP/s -- what bounds any
    speed-up that leaves the arithmetic as it is."""
    from torch.profiler import profile
    step = bare_step(batch, preset)
    step()
    with profile(with_flops=True) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = [e for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")]
    mm_us = sum(e.self_cpu_time_total for e in mm)
    attn_us = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
    return {"matmul_share": mm_us / total, "attention_share": attn_us / total,
            "matmul_gflops": sum(e.flops for e in mm) / max(mm_us, 1) / 1e3}


AVX2_CAP = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
            "ONEDNN_MAX_CPU_ISA": "AVX2"}


def plain_subprocess(cap: bool, steps: int) -> float:
    """plain_mae.py in a fresh process, optionally with every library capped at AVX2 (what a
    machine without AVX-512 runs; same clock, so only an estimate of such a machine)."""
    env = {**os.environ, **(AVX2_CAP if cap else {})}
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "plain_mae.py"), "--steps", str(steps)],
                         capture_output=True, text=True, env=env, check=True).stdout
    return float(out.split("plain MAE: ")[1].split()[0])


def demo_stages() -> dict[str, object]:
    """The newest demo's stage breakdown (runs/demo-*/stages.json, written by make demo)."""
    found = sorted((REPO / "runs").glob("demo-*/stages.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return {"note": "no demo yet: run `make demo` first"}
    return {"run": found[-1].parent.name, "rows": json.loads(found[-1].read_text())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fmnist_tiny")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed steps of plain and bare")
    ap.add_argument("--pipeline-steps", type=int, default=60)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--pipeline", action="append", default=None, metavar="OVERRIDES",
                    help="a pipeline setting: comma-separated --set overrides ('' = the preset's)")
    ap.add_argument("--loader-images", type=int, default=20000)
    ap.add_argument("--imagenet-images", type=int, default=2000, help="ImageNet-like JPEGs decoded")
    ap.add_argument("--gpu-throughput", type=Path, default=Path("runs/gpu_check/throughput.json"),
                    help="make gpu-check's MAE ViT-B/16 figure (else an assumption, named in the JSON)")
    ap.add_argument("--imagenet-decode-only", action="store_true",
                    help="run only the ImageNet decode section; update its key in --out")
    ap.add_argument("--out", type=Path, default=Path("runs/bench.json"))
    ap.add_argument("--one-pipeline", default=None, help=argparse.SUPPRESS)   # the child process
    args = ap.parse_args()
    if args.one_pipeline is not None:
        os.chdir(REPO)
        over = [o for o in args.one_pipeline.split(",") if o]
        print(pipeline_rate(args.preset, over, args.pipeline_steps, args.log_every))
        return 0
    os.chdir(REPO)                                  # data/ and runs/ are relative to the repository
    if args.imagenet_decode_only:
        result = json.loads(args.out.read_text()) if args.out.is_file() else {}
        result["imagenet_decode"] = imagenet_decode(args.imagenet_images, args.gpu_throughput)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out} (imagenet_decode)")
        return 0
    torch.set_num_threads(os.cpu_count() or 1)
    settings = args.pipeline if args.pipeline is not None else \
        ["", "train.compile=false", "train.zero_stage=2"]
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, ISA {' '.join(info['isa'])}, "
          f"ATen {info['aten_cpu_capability']}, torch {info['torch']}", flush=True)
    rates: dict[str, list[float]] = {}
    for r in range(args.rounds):
        rates.setdefault("plain", []).append(plain_rate(args.batch, args.steps))
        rates.setdefault("bare", []).append(bare_rate(args.batch, args.steps, args.preset))
        for s in settings:
            rates.setdefault(f"pipeline[{s or 'default'}]", []).append(
                pipeline_subprocess(args.preset, s, args.pipeline_steps, args.log_every))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    loader = loader_rate(args.preset, args.loader_images)
    decode = imagenet_decode(args.imagenet_images, args.gpu_throughput)
    shares = matmul_share(args.batch, args.preset)
    isa = {"native": plain_subprocess(False, args.steps), "avx2_cap": plain_subprocess(True, args.steps)}
    stages = demo_stages()
    print(f"\n{'step (MAE, demo ViT, batch %d)' % args.batch:44s} {'img/s':>7s} {'/plain':>7s} {'/bare':>7s}")
    for k, v in median.items():
        print(f"{k:44s} {v:7.0f} {v / median['plain']:7.2f} {v / median['bare']:7.2f}")
    print(f"{'FFCV training loader alone (2nd epoch)':44s} {loader:7.0f}")
    print(f"{'ImageNet JPEG decode + crop 224, per core':44s} {decode['img_per_cpu_s']['seeded']['1']:7.0f}"
          f"   -> {decode['cores_per_gpu']:.1f} cores per GPU at {decode['gpu']['img_per_s']:.0f} img/s")
    print(f"\nbare eager step: {100 * shares['matmul_share']:.0f}% of the time in matmuls at "
          f"{shares['matmul_gflops']:.0f} GFLOP/s, {100 * shares['attention_share']:.0f}% in attention")
    print(f"plain step in a fresh process: {isa['native']:.0f} img/s; with torch, MKL and oneDNN capped "
          f"at AVX2: {isa['avx2_cap']:.0f} img/s ({isa['native'] / isa['avx2_cap']:.2f}x slower)")
    if "rows" in stages:
        print(f"\nlast demo ({stages['run']}):")
        for row in stages["rows"]:
            name = f"  {row['stage']}" if row["stage"] else row["job"]
            print(f"  {name[:50]:50s} {row['seconds'] or 0:8.1f} s  {row['note']}")
    else:
        print(f"\nlast demo: {stages['note']}")
    result = {"machine": info, "preset": args.preset, "batch": args.batch, "rounds": rates,
              "median_img_per_s": median, "loader_img_per_s": loader, "imagenet_decode": decode,
              "demo": stages,
              "bare_profile": shares, "plain_isa": isa,
              "ratios": {k: {"plain": v / median["plain"], "bare": v / median["bare"]}
                         for k, v in median.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
