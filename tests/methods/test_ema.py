"""EMA teachers: the momentum schedules of shared/methods.md and the update rule."""
import math

import pytest
import torch
from torch import nn

from hpc_mim.methods.ema import EMATeacher, cosine_momentum


@pytest.mark.parametrize("base", [0.99, 0.996])
def test_cosine_momentum_matches_the_papers_formula(base):
    epochs = 800
    for ep in (0, 1, 200, 400, 799, 800):
        paper = 1 - 0.5 * (1 + math.cos(math.pi * ep / epochs)) * (1 - base)
        assert math.isclose(cosine_momentum(base, ep / epochs), paper, abs_tol=1e-12)
    assert cosine_momentum(base, 0.0) == pytest.approx(base) and cosine_momentum(base, 1.0) == 1.0


def test_update_is_m_teacher_plus_one_minus_m_student_for_weights_and_running_stats():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = EMATeacher(net=student)
    t0 = [p.clone() for p in teacher["net"].parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3).add_(1)
    student(torch.randn(8, 3))                   # moves the BatchNorm running statistics
    r0 = teacher["net"][1].running_mean.clone()
    teacher.update({"net": student}, 0.9)
    for a, t, s in zip(t0, teacher["net"].parameters(), student.parameters()):
        assert torch.allclose(t, 0.9 * a + 0.1 * s)
        assert not t.requires_grad
    # running statistics: the same EMA (timm's ModelEma averages the whole state dict)
    assert torch.allclose(teacher["net"][1].running_mean, 0.9 * r0 + 0.1 * student[1].running_mean)
    assert teacher["net"][1].num_batches_tracked.item() == 1
