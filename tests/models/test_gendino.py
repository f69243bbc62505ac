"""Gen-DINO: the disentanglement loss (vs. the loop reference, limits, gradients) and the objective
(total = L_DINO + λ·L_dis, one centre update from the DINO teacher outputs, λ=0 == DINOObjective)."""

from __future__ import annotations

import pytest
import torch

from genssl.engine.trainer import Progress
from genssl.models.dino import DINOLoss, dino_loss_reference
from genssl.models.gendino import (GenDINOConfig, GenDINOObjective, disentanglement_loss,
                                   disentanglement_loss_reference)
from genssl.models.objectives import DINOConfig, DINOObjective, build_dino_student

B, D, TAU_T, TAU_S = 5, 37, 0.04, 0.1
PROGRESS = Progress(global_step=0, epoch=0, step_in_epoch=0, steps_per_epoch=1, total_steps=1)
CFG = DINOConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, drop_path_rate=0)


def _logits(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t1, t2, s = (torch.randn(B, D, generator=g, dtype=dtype) * 3 for _ in range(3))
    alpha = torch.rand(B, generator=g, dtype=dtype)
    return t1, t2, alpha, s


def _loss_with_centre(seed: int) -> DINOLoss:
    loss = DINOLoss(D, student_temp=TAU_S)
    loss.center.copy_(torch.randn(1, D, generator=torch.Generator().manual_seed(seed)))
    return loss


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_reference(seed):
    t1, t2, alpha, s = _logits(seed)
    loss = _loss_with_centre(seed + 10)
    got = disentanglement_loss(loss, t1, t2, alpha, s, TAU_T)
    ref = disentanglement_loss_reference(t1, t2, alpha, s, loss.center.double(), TAU_T, TAU_S)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_alpha_limits_are_the_ordinary_teacher_targets():
    t1, t2, _, s = _logits(3)
    loss = _loss_with_centre(4)
    for alpha, teacher in ((torch.ones(B, dtype=torch.float64), t1), (torch.zeros(B, dtype=torch.float64), t2)):
        target = loss.teacher_probs(teacher, TAU_T)  # centred + sharpened target of that image alone
        torch.testing.assert_close(disentanglement_loss(loss, t1, t2, alpha, s, TAU_T),
                                   loss.cross_entropy(target, s), rtol=0, atol=0)
    # in between it is neither (the mix happens before the softmax, not after)
    half = torch.full((B,), 0.5, dtype=torch.float64)
    mixed_probs = 0.5 * loss.teacher_probs(t1, TAU_T) + 0.5 * loss.teacher_probs(t2, TAU_T)
    assert not torch.allclose(disentanglement_loss(loss, t1, t2, half, s, TAU_T), loss.cross_entropy(mixed_probs, s))


def test_gradient_reaches_only_the_student():
    t1, t2, alpha, s = (x.clone().requires_grad_(True) for x in _logits(5))
    loss = _loss_with_centre(6)
    disentanglement_loss(loss, t1, t2, alpha, s, TAU_T).backward()
    assert t1.grad is None and t2.grad is None and alpha.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    torch.testing.assert_close(s.grad.sum(-1), torch.zeros(B, dtype=torch.float64), atol=1e-12, rtol=0)  # softmax CE


def test_bad_shapes_are_refused():
    t1, t2, alpha, s = _logits(7)
    loss = _loss_with_centre(8)
    with pytest.raises(ValueError, match="alpha"):
        disentanglement_loss(loss, t1, t2, alpha[:-1], s, TAU_T)
    with pytest.raises(ValueError, match="teacher logits"):
        disentanglement_loss(loss, t1, t2[:-1], alpha, s, TAU_T)


# ------------------------------------------------------------------------------- objective


def _student(seed: int = 0):
    torch.manual_seed(seed)
    return build_dino_student("vit_tiny", 16, 8, CFG)


def _batch(seed: int = 0, n: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)] + [torch.randn(n, 3, 8, 8, generator=g)
                                                                           for _ in range(2)]
    return {"crops": crops, "indices": torch.arange(n), "interp": torch.randn(n, 3, 16, 16, generator=g),
            "partner": torch.randn(n, 3, 16, 16, generator=g), "alpha": torch.tensor([0.2, 0.6, 0.8])[:n],
            "partner_indices": torch.arange(n).flip(0), "from_gen": torch.zeros(n, dtype=torch.bool)}


def _perturb_teacher(objective, seed: int) -> None:
    """A teacher different from the student (as after EMA steps), and a non-zero centre."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in objective.teacher.module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        objective.loss.center.copy_(torch.randn(1, CFG.out_dim, generator=g))


def test_objective_total_and_single_centre_update():
    student = _student()
    lam = 0.7
    obj = GenDINOObjective(student, CFG, n_global=2, epochs=1, dtype=torch.float32, gen=GenDINOConfig(lambda_dis=lam))
    _perturb_teacher(obj, 1)
    batch = _batch()
    centre0 = obj.loss.center.clone()
    n = batch["crops"][0].shape[0]
    with torch.no_grad():  # the pieces, computed separately
        t_dino = obj.teacher(batch["crops"][:2])
        t_partner = obj.teacher([batch["partner"]])
        s_dino = student(batch["crops"])
        s_interp = student([batch["interp"]])
    l_dino = dino_loss_reference(s_dino, t_dino, centre0, CFG.teacher_temp, CFG.student_temp, 2)
    l_dis = disentanglement_loss_reference(t_dino[:n], t_partner, batch["alpha"], s_interp, centre0,
                                           CFG.teacher_temp, CFG.student_temp)

    loss, terms = obj.training_loss(student, batch, PROGRESS)
    torch.testing.assert_close(terms["loss_dino"], l_dino, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss_dis"], l_dis, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, l_dino + lam * l_dis, rtol=1e-5, atol=1e-6)
    # the centre waits until the engine keeps the step (a skipped step must leave no trace) ...
    assert torch.equal(obj.loss.center, centre0)
    obj.step_kept()
    # ... then one update, from the G global crops' teacher outputs only (not the partner or mixed logits)
    m = CFG.center_momentum
    torch.testing.assert_close(obj.loss.center, m * centre0 + (1 - m) * t_dino.mean(0, keepdim=True),
                               rtol=1e-6, atol=1e-6)
    with_partner = m * centre0 + (1 - m) * torch.cat([t_dino, t_partner]).mean(0, keepdim=True)
    assert not torch.allclose(obj.loss.center, with_partner, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)


def test_objective_runs_one_student_forward():
    student = _student()
    obj = GenDINOObjective(student, CFG, n_global=2, epochs=1, dtype=torch.float32)
    calls = []

    def engine(inputs):
        calls.append([tuple(x.shape[-2:]) for x in inputs])
        return student(inputs)

    obj.training_loss(engine, _batch(), PROGRESS)
    assert calls == [[(16, 16)] * 3 + [(8, 8)] * 2]  # globals + interp together, then the locals


@pytest.mark.parametrize("gen", [GenDINOConfig(lambda_dis=0.0), GenDINOConfig(interpolation=False)])
def test_without_dis_it_is_dino_exactly(gen):
    student = _student()
    dino = DINOObjective(student, CFG, n_global=2, epochs=1, dtype=torch.float32)
    gendino = GenDINOObjective(student, CFG, n_global=2, epochs=1, dtype=torch.float32, gen=gen)
    for obj in (dino, gendino):
        _perturb_teacher(obj, 2)
    batch = _batch(1)
    for step in range(2):  # the centre moves identically too
        ld, _ = dino.training_loss(student, (batch["crops"], batch["indices"]), PROGRESS)
        lg, terms = gendino.training_loss(student, batch, PROGRESS)
        assert torch.equal(ld, lg) and torch.equal(terms["loss_dino"], ld.detach()) and "loss_dis" not in terms
        dino.step_kept(), gendino.step_kept()
        assert torch.equal(dino.loss.center, gendino.loss.center)
    lp, _ = gendino.training_loss(student, (batch["crops"], batch["indices"]), PROGRESS)  # plain DINO batches too
    assert torch.isfinite(lp)


def test_missing_interpolation_inputs_and_bad_config():
    student = _student()
    obj = GenDINOObjective(student, CFG, n_global=2, epochs=1, dtype=torch.float32)
    batch = _batch()
    batch["interp"] = None
    with pytest.raises(ValueError, match="interpolation=True"):
        obj.training_loss(student, batch, PROGRESS)
    with pytest.raises(ValueError, match="p_gen"):
        GenDINOConfig(p_gen=1.5).validate()
    with pytest.raises(ValueError, match="lambda_dis"):
        GenDINOObjective(student, CFG, 2, 1, torch.float32, gen=GenDINOConfig(lambda_dis=-1))
