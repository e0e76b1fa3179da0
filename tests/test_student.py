import numpy as np
import pytest
import torch

from distill.data import build_split

from distill.histories import Histories
from distill.errors import ArtifactError
from distill.losses import LossInputs, NegativeSampler, SoftmaxLoss, WeightedLoss
from student.model import SASRec, SASRecConfig, load_student, save_student
from distill.positions import training_windows
from student.train import fit


def model(n_items=20, max_len=8, seed=0):
    torch.manual_seed(seed)
    return SASRec(SASRecConfig(n_items, max_len, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0)).eval()


def test_causality():
    m = model()
    a = torch.tensor([[0, 3, 5, 7, 2, 9]])
    b = a.clone()
    b[0, 4:] = torch.tensor([11, 12])
    ha, hb = m(a), m(b)
    assert torch.allclose(ha[:, :4], hb[:, :4], atol=1e-6)
    assert not torch.allclose(ha[:, 4:], hb[:, 4:])


def test_padding_invariance_and_no_nan():
    m = model()
    short = torch.tensor([[4, 6, 8]])
    padded = torch.tensor([[0, 0, 0, 0, 4, 6, 8]])
    assert torch.allclose(m.encode_users(short), m.encode_users(padded), atol=1e-5)
    assert torch.isfinite(m(torch.zeros(2, 5, dtype=torch.long))).all()


def test_user_vector_is_the_last_position_of_the_full_forward():
    m = model()
    seq = torch.tensor([[0, 0, 4, 6, 8, 1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 0, 0, 0, 0, 0]])
    assert torch.allclose(m.encode_users(seq), m(seq)[:, -1], atol=1e-6)


def test_full_softmax_equals_hand_computation():
    h = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    table = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([1, 3])
    s = h @ table[1:].T
    hand = -(s[0, 0] - s[0].logsumexp(0) + s[1, 2] - s[1].logsumexp(0)) / 2
    got = SoftmaxLoss()(LossInputs(h, y, table))
    assert got.item() == pytest.approx(hand.item(), rel=1e-6)


def test_sampled_softmax_with_every_item_equals_full():
    torch.manual_seed(0)
    h, table = torch.randn(6, 4), torch.randn(11, 4)
    y = torch.randint(1, 11, (6,))
    full = SoftmaxLoss()(LossInputs(h, y, table))
    sampled = SoftmaxLoss(sampler=NegativeSampler(10, 10))(LossInputs(h, y, table))
    assert sampled.item() == pytest.approx(full.item(), rel=1e-6)


def test_popularity_sampling_applies_logq():
    torch.manual_seed(0)
    pop = torch.ones(101)
    pop[0], pop[1] = 0, 10000
    sampler = NegativeSampler(100, 50, pop)
    ids, log_q = sampler.sample()
    assert (ids == 1).float().mean() > 0.8
    assert torch.allclose(log_q, sampler.probs[ids].log().float())


def test_training_windows_cover_every_position():
    train = Histories.from_rows([[1, 2, 3, 4, 5], [6, 7]])
    w = training_windows(train, 3)
    pairs = {(int(u), int(i), int(t)) for wi, u in enumerate(w.users) for i, t in zip(w.inputs[wi], w.targets[wi]) if t}
    assert pairs == {(0, 1, 2), (0, 2, 3), (0, 3, 4), (0, 4, 5), (1, 6, 7)}
    # newest window is right-aligned, older one left-padded
    assert w.targets[0].tolist() == [3, 4, 5] and w.targets[1].tolist() == [0, 0, 2]
    assert w.positions[0].tolist() == [2, 3, 4]


def test_checkpoint_round_trip_and_split_check(tmp_path):
    m = model()
    save_student(m, tmp_path / "ck", {"split_hash": "abc"})
    m2, meta = load_student(tmp_path / "ck", "abc", 20)
    x = torch.tensor([[1, 2, 3]])
    assert torch.equal(m.encode_users(x), m2.encode_users(x))
    with pytest.raises(ArtifactError, match="config.json: checkpoint built from split abc"):
        load_student(tmp_path / "ck", "other")
    with pytest.raises(ArtifactError, match="checkpoint has 20 items, the split has 30"):
        load_student(tmp_path / "ck", "abc", 30)


def test_early_stopping_never_reads_test(tiny_recipe, monkeypatch):
    split = build_split(tiny_recipe.data)
    real = split.targets

    def guarded(stage):
        assert stage != "test", "training read the test targets"
        return real(stage)

    monkeypatch.setattr(split, "targets", guarded)
    m = SASRec(SASRecConfig(split.n_items, 10, 16, 1, 2, 0.0))
    result = fit(m, split, tiny_recipe, WeightedLoss({"own": (1.0, SoftmaxLoss)}), seed=0)
    assert len(result.curve) == tiny_recipe.student.epochs and 1 <= result.best_epoch <= len(result.curve)


def test_collaborative_embedding_hand_computation_and_fold(tmp_path):
    from student.embedding_distillation import CollaborativeEmbedding
    teacher = np.array([[9.0, 9.0, 9.0], [3.0, 4.0, 0.0], [0.0, 0.0, 1.0]] + [[1.0, 0.0, 0.0]] * 18)  # (21, 3)
    torch.manual_seed(0)
    ced = CollaborativeEmbedding(teacher, 16, gamma=0.5)
    ids = torch.randn(21, 16)
    assert torch.equal(ced(ids), ids)                              # W starts at 0: the student alone's table
    zero = torch.zeros(21, 16)                                     # ced(0) is the term gamma W e^T alone
    torch.nn.init.normal_(ced.proj.weight)
    scale = np.mean([5.0, 1.0] + [1.0] * 18)                       # mean norm of rows 1..N
    t = torch.tensor(teacher, dtype=torch.float32) / scale
    t[0] = 0                                                       # the padding row stays 0
    expected = 0.5 * t @ ced.proj.weight.T                         # gamma * W e^T, (21, 16)
    assert torch.allclose(ced(zero), expected, atol=1e-6) and not ced(zero)[0].any()
    assert torch.allclose(ced(ids), ids + expected, atol=1e-6)
    ced.gamma = 1.0
    assert torch.allclose(ced(zero), 2 * expected, atol=1e-6)

    m = model()
    plain = m.item_vectors().copy()
    m.item_prior = ced
    x = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    assert np.allclose(m.item_vectors(), plain + 2 * expected.detach().numpy(), atol=1e-6)
    with torch.no_grad():
        before_users, before_items = m.encode_users(x), m.item_vectors().copy()
    assert not torch.allclose(before_users, model().encode_users(x))  # the prior changes the inputs too
    m.fold_item_prior()
    assert m.item_prior is None and not any(k.startswith("item_prior") for k in m.state_dict())
    save_student(m, tmp_path / "ck", {"split_hash": "abc"})
    folded = load_student(tmp_path / "ck", "abc", 20)[0]           # a plain SASRec checkpoint
    assert torch.allclose(folded.encode_users(x), before_users, atol=1e-5)
    assert np.allclose(folded.item_vectors(), before_items, atol=1e-6)
