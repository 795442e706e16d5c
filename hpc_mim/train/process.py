"""This process in the job: rank, device, threads and the process group (``join``), and the
random generators every checkpoint saves per rank (``rng_state``), for the one training loop.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from hpc_mim.distributed import deepspeed as ds
from hpc_mim.distributed.env import DistEnv, detect, set_threads, training_device


def rng_state(device: torch.device) -> dict:
    """Every generator a step draws from on this rank: masks, noise and augmentation come
    from the CUDA generator when training on a GPU, so a resume must restore that one too."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda":
        if "cuda" not in state:
            raise RuntimeError("the checkpoint holds no CUDA generator state (written by a CPU "
                               "run?): draws after the resume would differ from an uninterrupted run")
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


@dataclass
class Process:
    """This task of the job: rank / world, its device and CPU threads, in the process group."""
    env: DistEnv
    device: torch.device
    threads: int


def join(rendezvous_timeout_s: int = 300, collective_timeout_s: int = 1800,
         env: DistEnv | None = None) -> Process:
    """Find rank, device and threads, and join the process group (gloo on CPU, nccl on CUDA)."""
    env = env or detect()
    threads = set_threads(env)
    device = training_device(env)
    ds.init_distributed(env, device, rendezvous_timeout_s, collective_timeout_s)
    return Process(env, device, threads)
