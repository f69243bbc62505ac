"""engine/trainer.param_groups: weight decay, late (frozen first) and fixed-lr flags per parameter."""

from __future__ import annotations

import torch
from torch import nn

from genssl.engine.trainer import param_groups
from genssl.models.backbones import build_backbone
from genssl.models.simsiam import SimSiamConfig, SimSiamObjective, build_simsiam_student


def test_groups_split_decay_late_and_fixed_lr() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    late, fixed = {id(model[2].weight)}, {id(model[0].weight), id(model[0].bias)}
    groups = param_groups(model, late, fixed)
    where = {id(p): (g["decay"], g["late"], g["fixed"]) for g in groups for p in g["params"]}
    assert where[id(model[0].weight)] == (True, False, True)
    assert where[id(model[0].bias)] == (False, False, True)
    assert where[id(model[1].weight)] == (False, False, False)  # norm parameters: no decay
    assert where[id(model[2].weight)] == (True, True, False)
    assert where[id(model[2].bias)] == (False, False, False)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_simsiam_fixes_the_predictor_lr_by_default() -> None:
    backbone = build_backbone("resnet18", stem_stride=2)
    cfg = SimSiamConfig(hidden_dim=16, out_dim=8, predictor_hidden_dim=4)
    student = build_simsiam_student(backbone, cfg)
    objective = SimSiamObjective(student, cfg, 2, 1, torch.float32)
    assert {id(p) for p in objective.fixed_lr_parameters(student)} == {id(p) for p in student.predictor.parameters()}
    cfg_off = SimSiamConfig(hidden_dim=16, out_dim=8, predictor_hidden_dim=4, fix_pred_lr=False)
    assert SimSiamObjective(student, cfg_off, 2, 1, torch.float32).fixed_lr_parameters(student) == []
