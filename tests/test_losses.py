import math

import pytest
import torch

from distill.losses import (EmbeddingAlignment, ImportanceRankingKD, LossInputs, PairwiseRankingKD, SoftmaxLoss,
                            SoftTargetKL, TeacherTargets, WeightedLoss)


def inputs(teacher_scores=None, requires_grad=True):
    torch.manual_seed(0)
    h = torch.randn(3, 4, requires_grad=requires_grad)
    table = torch.randn(8, 4)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 1, 2]])
    s = torch.einsum("pd,pkd->pk", h.detach(), table[ids])
    scores = s.clone() if teacher_scores is None else teacher_scores
    t = TeacherTargets(torch.arange(3), ids, scores.requires_grad_(True), torch.randn(3, 5, requires_grad=True))
    return LossInputs(h, torch.tensor([1, 2, 3]), table, t)


def test_kl_is_zero_when_scores_match_and_hand_computed_otherwise():
    x = inputs()
    assert SoftTargetKL(2.0)(x).item() == pytest.approx(0.0, abs=1e-6)
    t_scores = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    x = inputs(t_scores)
    T = 2.0
    s = torch.einsum("pd,pkd->pk", x.hidden, x.item_table[x.teacher.ids])
    p, q = torch.softmax(t_scores / T, -1), torch.log_softmax(s / T, -1)
    hand = (p * (p.log() - q)).sum(-1).mean() * T * T
    assert SoftTargetKL(T)(x).item() == pytest.approx(hand.item(), rel=1e-5)


def test_pairwise_term_hand_computation():
    x = inputs()
    term = PairwiseRankingKD(n_items=7, lam=1.0, num_negatives=4)
    torch.manual_seed(1)
    got = term(x)
    torch.manual_seed(1)
    neg_ids = torch.randint(1, 8, (3, 4))
    h, E, ids = x.hidden, x.item_table, x.teacher.ids
    w = torch.exp(-torch.arange(3.0))
    w = w / w.sum()
    total = 0.0
    for p in range(3):
        valid = [j for j in range(4) if neg_ids[p, j] not in ids[p] and neg_ids[p, j] != x.targets[p]]
        for r in range(3):
            vals = [math.log(torch.sigmoid(h[p] @ E[ids[p, r]] - h[p] @ E[neg_ids[p, j]]).item()) for j in valid]
            total += -w[r].item() * (sum(vals) / max(len(vals), 1))
    assert got.item() == pytest.approx(total / 3, rel=1e-5)
    assert PairwiseRankingKD(n_items=7, lam=5.0, num_negatives=4)(x).item() != pytest.approx(got.item())


def test_teacher_terms_never_sample_the_target_or_a_history_item():
    from distill.losses.negatives import sample_negatives
    x = inputs()
    x.history = torch.tensor([[4, 5, 0], [1, 2, 0], [3, 4, 5]])
    torch.manual_seed(0)
    ids, valid = sample_negatives(x, torch.arange(3), n_items=7, num=2000, teacher_ids=x.teacher.ids)
    for p in range(3):
        forbidden = set(x.teacher.ids[p].tolist()) | {int(x.targets[p])} | set(x.history[p].tolist())
        assert not (set(ids[p][valid[p]].tolist()) & forbidden)                    # never kept
        assert set(ids[p][~valid[p]].tolist()) <= forbidden                         # only those dropped
        assert set(ids[p][valid[p]].tolist()) == set(range(1, 8)) - forbidden       # all others can be drawn


def test_importance_ranking_hand_computation():
    x = inputs(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))
    gammas = (0.3, 0.5, 0.2)
    term = ImportanceRankingKD(n_items=7, k=3, lam=1.0, gammas=gammas, temperature=2.0, num_negatives=3)
    torch.manual_seed(1)
    got = term(x).item()
    torch.manual_seed(1)
    neg_ids = torch.randint(1, 8, (3, 3))
    h, E, ids, ts = x.hidden.detach(), x.item_table, x.teacher.ids, x.teacher.scores.detach()
    total = 0.0
    for p in range(3):
        scores = [float(h[p] @ E[i]) for i in range(8)]
        student_top = sorted(range(1, 8), key=lambda i: -scores[i])[:3]
        pos = [math.exp(-r / 1.0) for r in (1, 2, 3)]
        conf = [math.exp(v / 2.0) for v in ts[p].tolist()]
        w = [gammas[0] * pos[r] / sum(pos) + gammas[1] * conf[r] / sum(conf)
             + gammas[2] * ((1.0 if int(ids[p, r]) in student_top else 0.0) + 1e-8) for r in range(3)]
        w = [v / sum(w) for v in w]
        valid = [int(j) for j in neg_ids[p] if int(j) not in ids[p].tolist() and int(j) != int(x.targets[p])]
        neg = sum(math.log(1 / (1 + math.exp(scores[j]))) for j in valid) / max(len(valid), 1)
        total += -sum(w[r] * (math.log(1 / (1 + math.exp(-scores[int(ids[p, r])]))) + neg) for r in range(3))
    assert got == pytest.approx(total / 3, rel=1e-5)
    torch.manual_seed(1)
    other = ImportanceRankingKD(n_items=7, k=3, lam=1.0, gammas=(1.0, 0.0, 0.0), temperature=2.0, num_negatives=3)
    assert other(x).item() != pytest.approx(got)                                   # the weights matter


def test_alignment_cosine_hand_computation():
    x = inputs()
    term = EmbeddingAlignment(4, 5, "cosine")
    mapped = term.map(x.hidden)
    hand = (1 - torch.cosine_similarity(mapped, x.teacher.query, dim=-1)).mean()
    assert term(x).item() == pytest.approx(hand.item(), rel=1e-5)
    assert EmbeddingAlignment(4, 5, "infonce")(x).item() > 0


def test_teacher_tensors_get_no_gradient_and_student_does():
    x = inputs(torch.randn(3, 3))
    loss = WeightedLoss({"own": (1.0, SoftmaxLoss), "kd": (1.0, lambda: SoftTargetKL(2.0)),
                         "pairwise": (0.5, lambda: PairwiseRankingKD(7)),
                         "ird": (0.2, lambda: ImportanceRankingKD(7, k=2)), "align": (0.1, lambda: EmbeddingAlignment(4, 5))})
    total, parts = loss(x)
    total.backward()
    assert set(parts) == {"own", "kd", "pairwise", "ird", "align"}
    assert x.hidden.grad is not None and x.hidden.grad.abs().sum() > 0
    assert x.teacher.scores.grad is None and x.teacher.query.grad is None


def test_total_is_the_weighted_sum_of_the_terms():
    x = inputs(torch.randn(3, 3))
    terms = {"own": SoftmaxLoss(), "kd": SoftTargetKL(2.0), "align": EmbeddingAlignment(4, 5)}
    weights = {"own": 0.7, "kd": 1.9, "align": 0.3}
    total, parts = WeightedLoss({n: (weights[n], lambda t=t: t) for n, t in terms.items()})(x)
    by_hand = sum(weights[n] * terms[n](x).item() for n in terms)
    assert total.item() == pytest.approx(by_hand, rel=1e-6)
    assert parts == pytest.approx({n: terms[n](x).item() for n in terms}, rel=1e-6)
    doubled, _ = WeightedLoss({n: (2 * weights[n], lambda t=t: t) for n, t in terms.items()})(x)
    assert doubled.item() == pytest.approx(2 * by_hand, rel=1e-6)


def test_zero_weight_terms_are_not_built_and_teacherless_batches_use_own_loss():
    def never():
        raise AssertionError("a term of weight 0 was built")

    loss = WeightedLoss({"own": (1.0, SoftmaxLoss), "kd": (0.0, never)})
    assert list(loss.terms) == ["own"] and not loss.needs_teacher
    x = inputs()
    x.teacher = None
    loss = WeightedLoss({"own": (1.0, SoftmaxLoss), "kd": (1.0, lambda: SoftTargetKL(1.0))})
    total, parts = loss(x)
    assert set(parts) == {"own"}


def test_own_softmax_can_leave_the_unseen_items_out_of_its_negatives():
    import torch
    from distill.losses import LossInputs, NegativeSampler, SoftmaxLoss
    torch.manual_seed(0)
    table = torch.randn(9, 4, requires_grad=True)
    h, y = torch.randn(5, 4), torch.tensor([1, 2, 3, 1, 2])
    exclude = torch.zeros(9, dtype=torch.bool)
    exclude[[6, 7]] = True
    for sampler in (None, NegativeSampler(8, 8)):
        table.grad = None
        SoftmaxLoss(sampler=sampler, exclude=exclude)(LossInputs(h, y, table)).backward()
        assert not table.grad[[6, 7]].any() and table.grad[[4, 5, 8]].abs().sum() > 0   # no "not this one"
        table.grad = None
        SoftmaxLoss(sampler=sampler)(LossInputs(h, y, table)).backward()
        assert table.grad[[6, 7]].abs().sum() > 0
