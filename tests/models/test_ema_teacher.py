"""The EMA teacher is deterministic given its weights and input: no drop path, no dropout."""

from __future__ import annotations

import pytest
import torch

from genssl.models.ema import EMATeacher
from genssl.models.objectives import DINOConfig, build_dino_student

CFG = DINOConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, drop_path_rate=0.5)


@pytest.mark.parametrize("model", ["vit_tiny", "resnet18"])
def test_teacher_has_no_stochastic_layers(model: str) -> None:
    torch.manual_seed(0)
    student = build_dino_student(model, 16, 8, CFG)
    for m in student.modules():  # timm zero-inits each residual branch's last BN: undo it, as training does
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    stochastic = [m for m in student.modules() if type(m).__name__ == "DropPath"]
    assert stochastic, "the student must train with drop path for this test to mean anything"
    teacher = EMATeacher(student)
    x = torch.randn(4, 3, 16, 16)
    first, second = teacher([x]), teacher([x])
    assert torch.equal(first, second), "teacher targets change from call to call"
    student_names = [n for n, _ in student.named_parameters()]
    assert [n for n, _ in teacher.module.named_parameters()] == student_names


def test_vit_teacher_equals_the_student_without_drop_path() -> None:
    torch.manual_seed(0)
    student = build_dino_student("vit_tiny", 16, 8, CFG)
    teacher = EMATeacher(student)
    x = torch.randn(3, 3, 16, 16)
    student.eval()  # eval mode turns drop path off; ViTs have no BatchNorm, so outputs must agree
    torch.testing.assert_close(teacher([x]), student([x]))
    student.train()
    assert not torch.equal(student([x]), student([x])), "drop path is on in the trained student"
