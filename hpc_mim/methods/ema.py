"""EMA ("momentum") teachers, shared by latent_mim and lut.

The teacher is a registered submodule with ``requires_grad=False``: the optimizer never sees
it, DeepSpeed saves it with the model in every checkpoint (so resuming restores it) and, under
ZeRO-3, partitions it like the student. The trainer calls the method's ``on_optimizer_step``
inside ``deepspeed.gathered(...)`` over the parameters the method lists in ``ema_parameters``,
so the update below always sees whole tensors.

Precision: with ``train.precision=bf16`` DeepSpeed casts every module parameter, the teacher's
included, to bf16; the update is computed in fp32 but stored in bf16, so with momentum near 1
small steps are rounded away. Use fp32 (or accept the rounding) when the teacher matters.
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
    ``teacher = m * teacher + (1 - m) * student``. ``teacher["encoder"]`` is a copy."""

    def __init__(self, **students: nn.Module) -> None:
        super().__init__()
        self.copies = nn.ModuleDict({k: copy.deepcopy(v) for k, v in students.items()})
        self.copies.requires_grad_(False)

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
            for t, s in zip(teacher.parameters(), student.parameters()):
                t.copy_((t.float() * momentum + s.detach().float() * (1.0 - momentum)).to(t.dtype))
            for t, s in zip(teacher.buffers(), student.buffers()):
                t.copy_(s)               # e.g. BatchNorm running statistics follow the student
