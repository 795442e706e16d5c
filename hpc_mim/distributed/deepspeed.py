"""DeepSpeed engine set-up and checkpoint IO (the only module that imports deepspeed).

We hand DeepSpeed a torch AdamW rather than naming one in the config: DeepSpeed's own optimizers
compile fused kernels on first use (~76 s on CPU), and the trainer keeps the lr schedule (timm)
on the torch optimizer's param groups, which ZeRO shares.

Precision. ``precision: bf16`` is mixed precision the way the papers trained (torch AMP):
DeepSpeed's ``torch_autocast`` section runs the engine's forward (and so its backward) under
``torch.autocast(bfloat16)``. Parameters stay fp32, and so do everything derived from them:
EMA teachers (a 1 - 0.996 momentum step is below bf16's resolution), BatchNorm statistics,
gradients and their all-reduce (``lower_precision_safe_modules: []``), the optimizer, and the
exported encoder. DeepSpeed's own ``bf16`` section would instead cast the whole module,
teachers included, to bf16; we never enable it.

Checkpoints are read with ``torch.load(weights_only=True)`` (``weights_only_loads``): DeepSpeed's
own reader would unpickle anything a run directory holds, and so run its code.
"""
from __future__ import annotations

import contextlib
import datetime
import importlib
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hpc_mim.distributed.env import DistEnv


def import_deepspeed_without_mlflow() -> Any:
    """``import deepspeed`` with mlflow standing aside.

    DeepSpeed's autotuner, imported with the package, imports mlflow in case it is asked to
    log there (~1 s of CPU in every rank of every start). We never autotune, and only rank 0
    logs, through hpc_mim/tracking.py, which imports mlflow when it first needs it."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        return importlib.import_module("deepspeed")
    sys.modules["mlflow"] = None          # `import mlflow` raises ImportError, which it catches
    try:
        return importlib.import_module("deepspeed")
    finally:
        del sys.modules["mlflow"]


deepspeed = import_deepspeed_without_mlflow()


def init_distributed(env: DistEnv, device: torch.device, rendezvous_timeout_s: int = 300,
                     collective_timeout_s: int = 1800) -> None:
    """Join the process group (gloo on CPU, nccl on CUDA).

    Two timeouts: every rank must reach the rendezvous store within ``rendezvous_timeout_s``
    (else an error naming host and port), while a collective may wait ``collective_timeout_s``
    for the slowest rank -- rank 0 alone writes MLflow, prunes checkpoints and fsyncs on a
    shared filesystem, which can take minutes without anything being wrong.

    The exported ``LOCAL_RANK`` is ``device``'s CUDA ordinal (``DistEnv.export``): DeepSpeed's
    engine, ``zero.Init`` and ZeRO utilities pick their GPU from it, and must pick ours."""
    env.export(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        try:
            # one process needs no rendezvous: an in-process store binds no port (a free port
            # probed earlier can be taken by another job on the node before the store binds it)
            store = dist.HashStore() if env.world_size == 1 else dist.TCPStore(
                env.master_addr, env.master_port, env.world_size, is_master=env.rank == 0,
                wait_for_workers=True, timeout=datetime.timedelta(seconds=rendezvous_timeout_s))
            dist.init_process_group(backend, store=store, rank=env.rank, world_size=env.world_size,
                                    timeout=datetime.timedelta(seconds=collective_timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        except Exception as e:  # noqa: BLE001 - rendezvous errors come in many types
            raise RuntimeError(f"rendezvous failed at {env.master_addr}:{env.master_port} "
                               f"(rank {env.rank}/{env.world_size}, backend {backend}): {e}") from e
    # DeepSpeed adopts the group above (its timeout included) instead of creating one
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=collective_timeout_s))


def zero_config(stage: int, overlap_comm: bool, bucket_size: int) -> dict[str, Any]:
    """The ``zero_optimization`` section: the stage, and how its gradient reduction is cut
    into buckets and overlapped with the backward (DeepSpeed 0.19, runtime/zero/config.py and
    stage_1_and_2.py; https://www.deepspeed.ai/docs/config-json/#zero-optimizations).

    DeepSpeed's defaults are ``overlap_comm`` off for stages 1-2 (on for 3) and buckets of 5e8
    elements, larger than ViT-B's whole MAE model (~112M parameters with its decoder): every
    gradient waits in one bucket whose all-reduce starts after the backward has finished, and
    ``contiguous_gradients`` allocates that bucket whole (5e8 fp32 = 2 GB per GPU). With
    ``overlap_comm`` each full bucket is reduced on a side stream while the backward computes
    the next (stage 2: every micro-batch, the gradients being partitioned; stage 1: on the
    micro-batch that ends an accumulation); it double-buffers, 2 x ``bucket_size`` elements.
    ``bucket_size`` = 2.5e7 (100 MB fp32): ViT-B's gradients come in ~5 buckets, so only the
    last one's all-reduce is left after the backward; each still moves 100 MB (4x PyTorch DDP's
    default 25 MB bucket, whose purpose is the same overlap), and the two buffers take 200 MB
    instead of the default's 2 GB. Larger models get more buckets, not larger. The same size bounds
    ``allgather_bucket_size`` (stages 1-2; with torch's all_gather_into_tensor DeepSpeed 0.19
    gathers each group in one call and uses it only as a fallback; it must be even, a 4-byte
    alignment in fp16 elements) and stage 3's ``stage3_prefetch_bucket_size`` (parameters
    fetched ahead of the forward and backward). Stage 0 has no ZeRO optimizer: the engine
    all-reduces after the backward and reads none of these keys."""
    if stage == 0:
        return {"stage": 0}
    section = {"stage": stage, "overlap_comm": overlap_comm, "contiguous_gradients": True,
               "reduce_bucket_size": bucket_size}
    if stage == 3:
        section["stage3_prefetch_bucket_size"] = bucket_size
    else:
        section["allgather_bucket_size"] = bucket_size + bucket_size % 2
    return section


def ds_config(train_cfg, world_size: int) -> dict[str, Any]:
    """DeepSpeed JSON config from a training budget (``hpc_mim.train.loop.Budget``) or the
    ``train`` section: batch sizes, accumulation, clipping, ZeRO (``zero_config``), precision."""
    return {
        "train_batch_size": train_cfg.batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.accumulation(world_size),
        "gradient_clipping": train_cfg.clip_grad,
        "zero_optimization": zero_config(train_cfg.zero_stage, train_cfg.zero_overlap_comm,
                                         train_cfg.zero_bucket_size),
        "torch_autocast": {"enabled": train_cfg.precision == "bf16", "dtype": "bfloat16",
                           "lower_precision_safe_modules": []},  # fp32 gradient all-reduce
        "zero_allow_untested_optimizer": True,   # torch AdamW under ZeRO: fine, see module doc
        "steps_per_print": 10 ** 9,              # our own progress lines instead
        "wall_clock_breakdown": False,
    }


def import_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer with ``torch.compile`` standing aside.

    With ZeRO on, ``deepspeed.initialize`` imports its Muon module (to check whether the optimizer
    is one), and that module wraps three kernels in ``torch.compile`` at import, which loads
    inductor: ~2.5 s of CPU in every rank of every start of every job. We never train with Muon,
    so its kernels may stay eager; ours (``train.compile``) are compiled later, as usual."""
    if "deepspeed.runtime.zero.muon.original_muon" in sys.modules:
        return
    compile_ = torch.compile
    torch.compile = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
    try:
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    finally:
        torch.compile = compile_


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, train_cfg, world_size: int):
    """Wrap ``model`` in a DeepSpeed engine (ZeRO stage, precision, accumulation, clipping).
    ``engine(batch)`` runs the forward under bf16 autocast when ``precision`` is bf16."""
    import_muon_uncompiled()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(train_cfg, world_size))
    return engine


def save_checkpoint(engine, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
    """Every rank writes its shard of ``folder/tag``; no DeepSpeed 'latest' file (ours is atomic)."""
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)


def checkpoint_classes() -> list[type]:
    """The classes DeepSpeed 0.19's checkpoints hold beyond tensors and plain data (ZeRO 0-3,
    bf16 autocast, AdamW): the loss scaler, the ZeRO stage enum and a fragment address."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads(engine):
    """DeepSpeed's checkpoint engine reads every file with ``torch.load(weights_only=False)``:
    a pickle placed in a run directory would run its code in whoever resumes the run. Inside
    this block the engine reads with ``weights_only=True``, allowing only ``checkpoint_classes``."""
    ckpt = engine.checkpoint_engine

    def load(path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)

    ckpt.load = load                          # an instance attribute shadows the method
    try:
        with torch.serialization.safe_globals(checkpoint_classes()):
            yield
    finally:
        del ckpt.load


def load_checkpoint(engine, folder: Path, tag: str) -> dict[str, Any]:
    with weights_only_loads(engine):
        path, client_state = engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {folder / tag}")
    return client_state or {}


def module_state_dict(engine, module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Full fp32 state dict of ``module`` (a submodule of the engine's model) on rank 0.

    Under ZeRO-3 the parameters are partitioned; every rank must call this so they can be
    gathered. Other ranks get None.
    """
    if engine.zero_optimization_stage() == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    else:
        sd = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return sd if engine.global_rank == 0 else None


@contextlib.contextmanager
def gathered(engine, read: list[nn.Parameter], write: list[nn.Parameter]):
    """Whole tensors of ``read`` and ``write`` inside the block; on exit, what was written to
    ``write`` is kept (rank 0's values are re-partitioned; every rank computes the same).
    Only ZeRO-3 partitions parameters; otherwise this does nothing."""
    if engine.zero_optimization_stage() != 3 or not (read or write):
        yield
        return
    with deepspeed.zero.GatheredParameters(read, modifier_rank=None), \
            deepspeed.zero.GatheredParameters(write, modifier_rank=0):
        yield


def consolidated_state_dict(folder: Path, tag: str) -> dict[str, torch.Tensor]:
    """The whole model's fp32 state dict from checkpoint ``folder/tag`` of any ZeRO stage,
    frozen parameters (EMA teachers) included; offline, on CPU, no process group needed. ZeRO
    shards go through DeepSpeed's ``zero_to_fp32``, which unpickles them (``weights_only=False``,
    hard-coded): run directories are private to their owner (hpc_mim/rundir.py) for this."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    path = Path(folder) / tag
    if list(path.glob("zero_pp_rank_*optim_states.pt")):           # ZeRO 1-3: sharded
        return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    with torch.serialization.safe_globals(checkpoint_classes()):
        blob = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in blob["module"].items()}
