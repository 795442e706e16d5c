"""EMA ("momentum") teachers, shared by latent_mim and lut.

The teacher is a registered submodule with ``requires_grad=False``: the optimizer never sees
it, DeepSpeed saves it with the model in every checkpoint (so resuming restores it) and, under
ZeRO-3, partitions it like the student. The trainer calls the method's ``on_optimizer_step``
inside ``deepspeed.gathered(...)`` over the parameters the method lists in ``ema_parameters``,
so the update below always sees whole tensors.

Precision: the teacher's weights are fp32 in every run. ``train.precision=bf16`` is autocast
(hpc_mim/distributed/deepspeed.py): the teacher's forward runs bf16 matmuls, but its weights --
and the update, whose step (1 - m)(s - t) with m = 0.996 is far below bf16's resolution -- stay
fp32, and the student it follows is the fp32 parameters the optimizer updates.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, progress: float) -> float:
    """``m = 1 - (1 - base) * (cos(pi * progress) + 1) / 2``: base at the start, 1 at the end
    (BYOL, arXiv 2006.07733; LatentMIM 0.99, LUT 0.996). ``progress`` in [0, 1]."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class EMATeacher(nn.Module):
    """Frozen copies of the named student modules, updated after every optimizer step as
    ``teacher = m * teacher + (1 - m) * student``. ``teacher["encoder"]`` is a copy.

    The copies are always in eval mode, as timm's ``ModelEma`` keeps the authors' teachers
    (naver-ai/lut ``util/model_ema_sched.py``): a BatchNorm in a teacher normalises with its
    running statistics, never with the batch's, and drop path / dropout are off. Those running
    statistics (float buffers) follow the student's by the same EMA as the weights, as
    ``ModelEma`` averages the whole state dict; integer buffers (batch counters) are copied."""

    def __init__(self, **students: nn.Module) -> None:
        super().__init__()
        self.copies = nn.ModuleDict({k: copy.deepcopy(v) for k, v in students.items()})
        self.copies.requires_grad_(False)
        self.copies.eval()

    def train(self, mode: bool = True) -> "EMATeacher":
        super().train(mode)
        self.copies.eval()              # method.train() must not put the teacher in train mode
        return self

    def __getitem__(self, name: str) -> nn.Module:
        return self.copies[name]

    def pairs(self, students: dict[str, nn.Module]) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.copies[k], students[k]) for k in self.copies]

    def parameters_of(self, students: dict[str, nn.Module]) -> tuple[list, list]:
        """(student, teacher) parameter lists: what ``update`` reads and writes."""
        read = [p for _, s in self.pairs(students) for p in s.parameters()]
        return read, list(self.copies.parameters())

    @torch.no_grad()
    def update(self, students: dict[str, nn.Module], momentum: float) -> None:
        for teacher, student in self.pairs(students):
            t_params, s_params = list(teacher.parameters()), list(student.parameters())
            if any(t.dtype != torch.float32 for t in t_params):
                raise TypeError("EMA teacher weights must be fp32 (a bf16 teacher rounds the "
                                "momentum step away); something cast the module")
            # t + (1 - m)(s - t) = m t + (1 - m) s, one fused kernel per dtype/device group
            torch._foreach_lerp_(t_params, [s.detach().float() for s in s_params], 1.0 - momentum)
            for t, s in zip(teacher.buffers(), student.buffers()):
                if t.is_floating_point():            # BatchNorm running mean / var
                    t.lerp_(s.to(t.dtype), 1.0 - momentum)
                else:                                # num_batches_tracked
                    t.copy_(s)
