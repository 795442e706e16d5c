"""``make check-paper-scale``: every method's paper recipe and every evaluation's paper protocol at
their real shapes, on this CPU, end to end through the local SLURM cluster (2 pretend nodes).

This finds what the 28 px presets hide: channel counts, position embeddings on other grids, JPEG
decoding, layer decay over 12 blocks, LatentMIM's gapped grid, UMD's 4 cls tokens and AdaLN,
ZeRO-3 with bf16 autocast across two nodes. Steps:

1. Data (data_prep.synthetic): an ImageNet-layout JPEG tree of 500x375 ... 1024x768 images,
   converted by ``data_prep.image_folder --mode jpg``; ADE20K- and COCO-layout scenes of
   512x683 ... 683x512 px.
2. Per method, ``jobs/submit.py --method M --cluster slurm --nodes 2`` with the paper YAML
   unchanged but for the dataset (the synthetic tree, 4 classes: ``imagenet_synthetic``, so the
   classification heads have 4 outputs where ImageNet's have 1000), the batch size (2 per rank),
   the step count (2), ZeRO stage 3, and the evaluations' iteration counts: pre-training in bf16, the export, then every evaluation at
   its protocol's resolution (fine-tuning at the encoder's size, segmentation 512 crops with
   sliding-window inference, detection 1024 px); waits for every job.
3. Per stage, the activation memory per image: the bytes autograd saves for the backward pass
   (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded) of one forward at two
   batch sizes, extrapolated linearly to the paper's per-GPU batch -- the memory to expect on a
   GPU on top of weights and optimizer state (fused attention kernels save less than this
   CPU's; this is an upper bound).

Prints a table and writes ``<out>/paper_scale.json``; exit 1 if a stage failed.

    python benchmarks/paper_scale.py --out runs/paper_scale [--methods mae lut] [--skip-memory]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hpc_mim.config import ClusterConfig, Config  # noqa: E402
from hpc_mim.methods import REGISTRY  # noqa: E402

STAGES = ("pretrain", "knn", "linear_probe", "finetune", "segmentation", "detection")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

# Only what a CPU needs changed; everything else is the method's paper YAML and the evaluations'
# paper defaults (hpc_mim/eval_options.py).
OVERRIDES = [
    "data.dataset=imagenet_synthetic",      # the synthetic tree's 4 classes (configs/datasets.yaml)
    "train.micro_batch_size=2", "train.batch_size=4", "train.max_steps=2", "train.zero_stage=3",
    "train.log_every=1", "data.num_workers=1", "cluster.cpus_per_task=1",
    "cluster.time_min=120", "cluster.eval_time_min=120",
    "evals=[knn, linear_probe, finetune, segmentation, detection]",
    "eval.batch_size=8", "eval.knn.max_train_samples=40", "eval.linear_probe.max_train_samples=40",
    "eval.linear_probe.epochs=2", "eval.linear_probe.warmup_epochs=1", "eval.linear_probe.batch_size=16",
    "eval.finetune.nodes=1", "eval.detection.nodes=1",     # the paper: as many GPUs as pre-training
    "eval.finetune.batch_size=2", "eval.finetune.micro_batch_size=2", "eval.finetune.max_steps=2",
    "eval.segmentation.steps=2", "eval.segmentation.warmup_steps=1", "eval.segmentation.batch_size=2",
    "eval.segmentation.max_val_samples=1",
    "eval.detection.steps=1", "eval.detection.warmup_steps=1", "eval.detection.batch_size=1",
    "eval.detection.max_val_samples=1",
]


def sh(*cmd: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, text=True, capture_output=True, **kwargs)


def make_data(root: Path) -> None:
    """The synthetic trees and the .beton files, once."""
    if (root / "imagenet" / "val.beton").is_file():
        return
    for cmd in ([sys.executable, "-m", "data_prep.synthetic", "--out", str(root), "--classes", "4",
                 "--train", "30", "--val", "8", "--scenes", "4", "--force"],   # redone after a failure
                [sys.executable, "-m", "data_prep.image_folder", "--src", str(root / "imagenet_tree"),
                 "--out", str(root / "imagenet"), "--mode", "jpg"]):
        r = sh(*cmd)
        print(r.stdout.strip())
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")


def job_state(job_id: str) -> tuple[str, str]:
    out = sh("scontrol", "show", "job", "-o", job_id).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    return fields.get("JobState", "UNKNOWN"), fields.get("Reason", "")


def stage_results(jobs: dict[str, Any], never: set[str] = frozenset(),
                  states: dict[str, tuple[str, str]] | None = None) -> dict[str, dict]:
    """Each stage's state, wall time, peak RSS and error, from the jobs' status records."""
    results = {}
    for stage in STAGES:
        path = Path(jobs[stage]["status_file"])
        record = json.loads(path.read_text()) if path.is_file() else {}
        state = "NEVER STARTED" if stage in never else \
            (states[stage][0] if states else record.get("state", "UNKNOWN"))
        results[stage] = {"state": state, **{k: record.get(k) for k in ("seconds", "peak_rss_mb", "error")}}
    return results


def finished_run(method: str, runs_root: Path) -> tuple[Path, dict[str, dict]] | None:
    """The newest earlier chain of ``method`` whose six jobs all completed (the check resumes)."""
    for run in sorted(runs_root.glob(f"paper-{method}-*"), reverse=True):
        index = run / "jobs" / "jobs.json"
        if index.is_file():
            results = stage_results(json.loads(index.read_text()))
            if all(r["state"] == "COMPLETED" for r in results.values()):
                return run, results
    return None


def run_method(method: str, data_root: Path, runs_root: Path) -> tuple[Path, dict[str, dict]]:
    """Submit the method's chain on 2 pretend nodes and wait; each stage's status record."""
    name = f"paper-{method}-{time.strftime('%H%M%S')}"
    r = sh(sys.executable, "jobs/submit.py", "--method", method, "--cluster", "slurm", "--nodes", "2",
           "--tasks-per-node", "1", "--set", f"name={name}", "--set", f"data.root={data_root}",
           "--set", f"runs_root={runs_root}", *[a for o in OVERRIDES for a in ("--set", o)],
           # scripts/local_slurm.sh: both pretend nodes are this machine, the sqlite store on its disk
           "--set", "tracking.allow_file_store=true")
    if r.returncode:
        raise SystemExit(f"submit {method} failed:\n{r.stdout}\n{r.stderr}")
    run = runs_root / name
    jobs = json.loads((run / "jobs" / "jobs.json").read_text())
    start = time.time()
    while True:
        states = {stage: job_state(jobs[stage]["job_id"]) for stage in STAGES}
        never = {s for s, (st, why) in states.items() if st == "PENDING" and "NeverSatisfied" in why}
        done = {s for s, (st, _) in states.items() if st in TERMINAL} | never
        print(f"[paper-scale] {method} {time.time() - start:5.0f}s " +
              " ".join(f"{s}={states[s][0]}" for s in STAGES), flush=True)
        if len(done) == len(STAGES):
            break
        time.sleep(20)
    for stage in never:
        sh("scancel", jobs[stage]["job_id"])
    return run, stage_results(jobs, never, states)


# ------------------------------------------------------------------ activation memory

def saved_bytes(forward: Callable[[], Any], module: torch.nn.Module) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``forward()``,
    parameters excluded (they are there anyway)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def paper_cluster(cfg: Config) -> ClusterConfig:
    """The paper recipe's pre-training cluster: its global batch over its per-GPU micro batch,
    without accumulation (MAE: 4096 / 64 = 64 GPUs = 8 nodes x 8), 8 GPUs a node."""
    gpus = max(1, cfg.train.batch_size // cfg.train.micro_batch_size)
    per_node = 8 if gpus % 8 == 0 else gpus
    return ClusterConfig(nodes=gpus // per_node, tasks_per_node=per_node, gpus_per_node=per_node)


def stage_model(stage: str, cfg: Config, run: Path) -> tuple[torch.nn.Module, Callable[[int], Any], int, bool]:
    """(model, forward(batch) returning a scalar, the paper's per-GPU batch, bf16 autocast);
    ``cfg``: the paper config (no CPU overrides), ``run``: where the exported encoder is."""
    from hpc_mim.methods import build_method
    from hpc_mim.models.vit import load_encoder
    e = cfg.eval
    if stage == "pretrain":
        model = build_method(cfg.model, cfg.method)
        s, views = model.input_size, ("image", *model.extra_views)
        return (model, lambda b: model({v: torch.randn(b, 3, s, s) for v in views})["loss"],
                cfg.train.micro_batch_size, cfg.train.precision == "bf16")
    encoder = load_encoder(run / "encoder.pt", weights=False, drop_path=0.1)
    if stage == "finetune":
        from evaluation.finetune import Classifier
        model, size = Classifier(encoder, 1000, e.finetune.pooling), encoder.config["img_size"]
        nodes, tasks, _, _ = e.finetune.resources(paper_cluster(cfg))   # nodes 0: as pre-training
        return (model, lambda b: model(torch.randn(b, 3, size, size)).float().mean(),
                e.finetune.micro_batch(nodes * tasks), e.finetune.precision == "bf16")
    if stage == "segmentation":
        from evaluation.dense_heads import default_blocks
        from evaluation.segmentation import Segmenter
        s = e.segmentation
        from hpc_mim.models.relpos import add_relative_position
        if s.rel_pos:               # BEiT's tables on the crop's grid, as the evaluation adds them
            add_relative_position(encoder, "table", encoder.grid_of((s.crop_size, s.crop_size)))
        model = Segmenter(encoder, 150, s.channels, s.blocks or default_blocks(encoder.depth), s.rescales,
                          aux_channels=s.aux_channels if s.aux_weight else 0)
        # mmsegmentation's ADE20K runs: batch 16 = 8 GPUs x 2
        def seg_forward(b: int) -> torch.Tensor:        # training: the aux head's logits too
            out = model(torch.randn(b, 3, s.crop_size, s.crop_size), aux=True)
            return sum(o.float().mean() for o in out if o is not None)
        return model, seg_forward, max(1, s.batch_size // 8), False
    from evaluation.detection import Detector
    s = e.detection
    model = Detector(encoder, 11, s, [0.5] * 3, [0.25] * 3, masks=True)
    h, w = s.image_size * 3 // 4, s.image_size

    def forward(b: int):
        mask = torch.zeros(h, w, dtype=torch.uint8)
        mask[h // 4:h // 2, w // 4:w // 2] = 1
        target = {"boxes": torch.tensor([[w / 4, h / 4, w / 2, h / 2]]), "labels": torch.tensor([1]),
                  "masks": mask[None]}
        return sum(model([torch.rand(3, h, w) for _ in range(b)], [dict(target) for _ in range(b)]).values())
    return model, forward, max(1, s.batch_size // 64), False          # ViTDet: 64 GPUs x 1


def probe_in_child(stage: str, method: str, run: Path, sizes: tuple[int, int]) -> dict[str, Any]:
    """``activation_memory`` in a process of its own: a 1024 px detection forward leaves
    gigabytes in the allocator that this long-lived process would otherwise keep. A probe that
    fails (the kernel's OOM killer on a small machine: ViTDet at 1024 px keeps ~12 GB per image
    in fp32 on a CPU) gives ``{"error": ...}``: its row shows no memory, the others go on."""
    r = sh(sys.executable, __file__, "--probe", stage, method, str(run), *map(str, sizes))
    if r.returncode:
        cause = (f"killed by signal {-r.returncode}" + (" (out of memory?)" if r.returncode == -9 else "")
                 if r.returncode < 0 else f"exit {r.returncode}: {r.stderr.strip()[-500:]}")
        print(f"[paper-scale] memory probe {stage} {method} at batches {sizes} failed: {cause}", flush=True)
        return {"error": f"memory probe at batches {sizes}: {cause}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def activation_memory(stage: str, method: str, run: Path, sizes: tuple[int, int]) -> dict[str, float]:
    from hpc_mim.config import load_config
    model, forward, paper_batch, bf16 = stage_model(stage, load_config(method), run)
    model.train()
    measured = []
    for b in sizes:
        torch.manual_seed(0)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            measured.append(saved_bytes(lambda: forward(b), model))
    per_image = (measured[1] - measured[0]) / (sizes[1] - sizes[0])
    fixed = measured[0] - per_image * sizes[0]
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "act_mb_per_image": per_image / 2 ** 20, "paper_batch": paper_batch,
            "act_gb_at_paper_batch": (fixed + per_image * paper_batch) / 2 ** 30,
            "measured_at": list(sizes)}


# ------------------------------------------------------------------ report

def table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "stage", "result", "s", "peak RSS MB", "params M", "act MB/img",
            "paper batch/GPU", "act GB at it")
    lines = [head]
    for r in rows:
        m = r.get("memory") or {}
        fmt = lambda v, f: "-" if v is None else format(v, f)          # noqa: E731
        lines.append((r["method"], r["stage"], r["state"], fmt(r.get("seconds"), ".0f"),
                      fmt(r.get("peak_rss_mb"), ".0f"), fmt(m.get("params_m"), ".1f"),
                      fmt(m.get("act_mb_per_image"), ".1f"), fmt(m.get("paper_batch"), "d"),
                      fmt(m.get("act_gb_at_paper_batch"), ".2f")))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    return "\n".join([out[0], "|" + "|".join("-" * (w + 2) for w in widths) + "|", *out[1:]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "paper_scale")
    ap.add_argument("--methods", nargs="+", default=sorted(REGISTRY), choices=sorted(REGISTRY))
    ap.add_argument("--skip-memory", action="store_true", help="no activation-memory measurement")
    ap.add_argument("--fresh", action="store_true", help="run every chain again (default: reuse "
                    "a method's newest chain whose jobs all completed)")
    ap.add_argument("--probe", nargs=5, metavar=("STAGE", "METHOD", "RUN", "B1", "B2"),
                    help=argparse.SUPPRESS)       # internal: one memory probe, JSON on stdout
    args = ap.parse_args()
    if args.probe:
        stage, method, run, b1, b2 = args.probe
        print(json.dumps(activation_memory(stage, method, Path(run), (int(b1), int(b2)))))
        return 0
    out = args.out.resolve()
    data_root, runs_root = out / "data", out / "runs"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    print(f"[paper-scale] {cpu}; data and runs under {out}", flush=True)
    make_data(data_root)
    rows, probed, start, chains = [], {}, time.time(), {}
    for method in args.methods:            # the SLURM chains first: probes would compete for memory
        reused = None if args.fresh else finished_run(method, runs_root)
        if reused:
            print(f"[paper-scale] {method}: reusing {reused[0]} (all jobs completed)", flush=True)
        chains[method] = reused or run_method(method, data_root, runs_root)
    for method, (run, results) in chains.items():
        for stage in STAGES:
            row = {"method": method, "stage": stage, "run": str(run), **results[stage]}
            trains = stage not in ("knn", "linear_probe")      # frozen features: nothing saved
            if trains and not args.skip_memory and (run / "encoder.pt").is_file():
                arch = json.dumps([stage, method if stage == "pretrain" else
                                   torch.load(run / "encoder.pt", weights_only=True)["model"]])
                if arch not in probed:
                    # UperNet's pooled branch needs 2 images per BatchNorm in training mode
                    sizes = {"segmentation": (2, 3), "detection": (1, 2)}.get(stage, (2, 4))
                    print(f"[paper-scale] activation memory: {method} {stage} at batches {sizes}", flush=True)
                    probed[arch] = probe_in_child(stage, method, run, sizes)
                row["memory"] = probed[arch]
            rows.append(row)
        print(table([r for r in rows if r["method"] == method]), flush=True)
    report = {"cpu": cpu, "seconds": round(time.time() - start), "overrides": OVERRIDES, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper_scale.json").write_text(json.dumps(report, indent=2))
    print(f"\n{table(rows)}\n\n[paper-scale] {cpu}, {report['seconds']} s; {out / 'paper_scale.json'}")
    failed = [f"{r['method']}/{r['stage']}: {r['state']} {r.get('error') or ''}" for r in rows
              if r["state"] != "COMPLETED"]
    failed += [f"{r['method']}/{r['stage']}: {r['memory']['error']}" for r in rows
               if "error" in r.get("memory", {})]
    for line in failed:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
