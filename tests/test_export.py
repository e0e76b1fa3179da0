"""`anyo export` / `anyo recommend`: the served ranking is the evaluated ranking; tampering is refused."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from helpers import RECIPE, sets, tiny_recipe_overrides

from distill.artifacts import sha256_file
from distill.cli import main
from distill.data import load_split
from distill.histories import Histories
from distill.errors import ArtifactError
from distill.exported import INT8_FILE, load_export
from distill.search import Exclusions, ItemIndex
from distill.export import PARITY_TOLERANCE
from distill.harness import evaluate, repeated_targets
from distill.recommender import ENCODE_CHUNK, ONNX_OPSET, Recommender, onnx_session
from student.model import SASRecConfig


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    run, _ = tiny_run
    out = tmp_path_factory.mktemp("export") / "distilled"
    assert main(["export", str(run), "--out", str(out)]) == 0
    return run, out


def test_export_folder_is_self_contained(exported):
    run, out = exported
    manifest = json.loads((out / "manifest.json").read_text())
    names = {"model.safetensors", "model.onnx", "config.json", "items.tsv", "items.faiss", "metrics.json", "README.md"}
    assert set(manifest["files"]) == names and {p.name for p in out.iterdir()} == names | {"manifest.json"}
    assert manifest["onnx"]["opset"] == ONNX_OPSET and manifest["mask_history"] is True
    parity = manifest["onnx"]["parity"]
    assert parity["users"] > 0 and 0 <= parity["relative_diff"] <= parity["tolerance"] == PARITY_TOLERANCE
    split = load_split(run / "split")
    card = (out / "README.md").read_text()
    metrics = json.loads((run / "student_distilled" / "metrics.json").read_text())
    assert split.hash in card and f"{metrics['metrics']['NDCG@10']:.4f}" in card
    exp = load_export(out)
    assert exp.raw_ids[1:] == split.items[1:] and exp.n_items == split.n_items


def served_ranks(exp, split, **kw) -> np.ndarray:
    """Each test user's target position in the served top-20 (-1 = not in it), as test_ranks.npy holds it."""
    hist, targets = split.history("test"), split.targets("test")
    raw = [[split.items[i] for i in hist.row(u)] for u in range(split.n_users)]
    served = exp.recommend_many(raw, k=min(20, split.n_items), **kw)
    return np.array([next((r for r, it in enumerate(items) if it["item"] == split.items[targets[u]]), -1)
                     for u, items in enumerate(served)])


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])  # onnxruntime-int8: measured, not equal (below)
def test_served_ranking_is_the_harness_ranking(exported, runtime):
    """For every test user, on either runtime: the target's position in the served list is the one in
    test_ranks.npy, a target that repeats a history item included (a miss in both)."""
    run, out = exported
    split = load_split(run / "split")
    exp = load_export(out, runtime=runtime)
    assert exp.recommender.runtime == runtime
    hist, targets = split.history("test"), split.targets("test")
    ranks = np.load(run / "student_distilled" / "test_ranks.npy")
    repeated = repeated_targets(hist, targets)
    record = json.loads((run / "student_distilled" / "metrics.json").read_text())
    assert record["repeated_targets"] == repeated.sum() > 0   # the toy data has repeat consumption
    assert np.array_equal(served_ranks(exp, split), ranks) and (ranks[repeated] == -1).all()
    # and the whole lists equal the harness's search over the same vectors with the same masking
    users = exp.recommender.model.encode(hist)
    ids, _ = ItemIndex(exp.recommender.items.numpy()).search(users, 10, Exclusions.from_histories(hist, split.n_items + 1))
    served = exp.recommend_many([[split.items[i] for i in hist.row(u)] for u in range(split.n_users)], k=10)
    served_ids = [[exp.id_of[it["item"]] for it in items[:10]] for items in served]
    assert [list(r[r > 0]) for r in ids] == served_ids


def test_recommend_cli_json_and_seen_items(exported, capsys):
    run, out = exported
    split = load_split(run / "split")
    history = [split.items[i] for i in split.history("test").row(0)]
    capsys.readouterr()
    assert main(["recommend", str(out), "--history", ",".join(history), "-k", "5", "--json"]) == 0
    items = json.loads(capsys.readouterr().out)["items"]
    assert len(items) == 5 and not set(it["item"] for it in items) & set(history)
    assert items == load_export(out).recommend(history, 5)
    assert [it["score"] for it in items] == sorted((it["score"] for it in items), reverse=True)
    assert main(["recommend", str(out), "--history", ",".join(history), "-k", "5", "--include-seen", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == load_export(out).recommend(history, 5, include_seen=True)
    assert main(["recommend", str(out), "--history", f"{history[0]},nope,zilch", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("anyo: error:") and "'nope'" in err and "'zilch'" in err and "\n" not in err


def test_tampered_or_missing_file_is_refused(exported, tmp_path, capsys):
    _, out = exported
    for name, damage in [("items.tsv", lambda p: p.write_text(p.read_text().replace("\t", " ", 1))),
                         ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\0")),
                         ("model.onnx", lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\0")),
                         ("items.faiss", lambda p: p.unlink()),
                         ("manifest.json", lambda p: p.write_text(p.read_text().replace('"model": "student_distilled"',
                                                                                         '"model": "student_alone"')))]:
        copy = tmp_path / name
        shutil.copytree(out, copy)
        damage(copy / name)
        with pytest.raises(ArtifactError, match=name):
            load_export(copy)
        capsys.readouterr()
        assert main(["recommend", str(copy), "--history", "x"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("anyo: error:") and name in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def quantized(tiny_run, tmp_path_factory):
    run, _ = tiny_run
    out = tmp_path_factory.mktemp("export") / "int8"
    assert main(["export", str(run), "--out", str(out), "--quantize", "int8"]) == 0
    return run, out


def test_int8_export_is_sealed_measured_and_served(quantized, capsys):
    """model.int8.onnx is sealed in the manifest; its recorded fp32 side is the evaluated metrics, its int8 side
    is what `--runtime onnxruntime-int8` serves, and that runtime runs model.int8.onnx, not model.onnx."""
    run, out = quantized
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"][INT8_FILE] == sha256_file(out / INT8_FILE)
    assert {p.name for p in out.iterdir()} == set(manifest["files"]) | {"manifest.json"}
    split = load_split(run / "split")
    evaluated = json.loads((run / "student_distilled" / "metrics.json").read_text())["metrics"]
    q = manifest["onnx"]["int8"]["quality"]
    assert q["users"] == split.n_users and q["fp32"] == pytest.approx({k: evaluated[k] for k in q["fp32"]}, abs=1e-12)
    assert f"| {INT8_FILE} (int8) | {q['int8']['NDCG@10']:.4f} |" in (out / "README.md").read_text()
    int8, fp32 = load_export(out, runtime="onnxruntime-int8"), load_export(out, runtime="onnxruntime")
    hist = split.history("test")
    chunks = [hist.take(np.arange(lo, min(lo + ENCODE_CHUNK, len(hist)))) for lo in range(0, len(hist), ENCODE_CHUNK)]
    users = np.concatenate([int8.recommender.encode(c).numpy() for c in chunks])
    assert not np.allclose(users, np.concatenate([fp32.recommender.encode(c).numpy() for c in chunks]), atol=1e-5)
    on_disk = onnx_session((out / INT8_FILE).read_bytes(), torch.get_num_threads())
    assert np.array_equal(users[:len(chunks[0])], on_disk.run(None, {"history": chunks[0].padded(
        int(min(chunks[0].lengths.max(), int8.recommender.max_len)))})[0])
    served = evaluate(split, users, int8.recommender.items.numpy(), "test", ks=(10,)).metrics
    assert q["int8"] == pytest.approx({k: served[k] for k in q["int8"]}, abs=1e-12)
    history = [split.items[i] for i in hist.row(0)]
    capsys.readouterr()
    assert main(["recommend", str(out), "--history", ",".join(history), "--runtime", "onnxruntime-int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == int8.recommend(history)


def test_int8_file_tampered_or_not_sealed_is_refused(quantized, exported, tmp_path, capsys):
    _, out = quantized
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    (damaged / INT8_FILE).write_bytes((damaged / INT8_FILE).read_bytes()[:-1] + b"\0")
    with pytest.raises(ArtifactError, match=INT8_FILE):
        load_export(damaged, runtime="onnxruntime-int8")
    # an int8 file the manifest does not list (copied in beside an export made without it) is never served
    unlisted = tmp_path / "unlisted"
    shutil.copytree(exported[1], unlisted)
    shutil.copyfile(out / INT8_FILE, unlisted / INT8_FILE)
    capsys.readouterr()
    for folder, why in [(damaged, "content does not match manifest.json"), (unlisted, f"has no {INT8_FILE}")]:
        assert main(["recommend", str(folder), "--history", "x", "--runtime", "onnxruntime-int8"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("anyo: error:") and INT8_FILE in err and why in err and err.count("\n") == 1


def test_export_refuses_unsafe_out(exported, tmp_path, capsys):
    run, out = exported
    for bad in (run / "export", run / "student_distilled" / "x", run):
        assert main(["export", str(run), "--out", str(bad)]) == 2
        assert "inside the run folder" in capsys.readouterr().err
        assert not (run / "export").exists() and not (run / "student_distilled" / "x").exists()
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(user)]) == 2
    assert "not an anyo export" in capsys.readouterr().err and (user / "notes.txt").read_text() == "keep me"
    # a previous export is replaced (atomically), with the other model
    again = tmp_path / "again"
    shutil.copytree(out, again)
    assert main(["export", str(run), "--out", str(again), "--model", "student_alone"]) == 0
    assert load_export(again).manifest["model"] == "student_alone"


class IntegerModel(torch.nn.Module):
    """A stand-in encoder with small-integer user and item vectors: every score is exact, so ties are exact."""

    def __init__(self, n_items: int, dim: int = 4):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.cfg = SASRecConfig(n_items=n_items, max_len=8)
        self.table = torch.randint(-2, 3, (5, dim), generator=g).float()[torch.arange(n_items + 1) % 5]
        self.table[0] = 0

    def encode_users(self, padded):
        return torch.stack([padded[:, -1] % 3 - 1, padded[:, -2] % 2, padded.sum(1) % 3 - 1,
                            torch.ones(len(padded), dtype=torch.int64)], 1).float()

    def item_vectors(self):
        return self.table.numpy()


def test_ties_are_broken_by_lower_id_like_the_harness():
    """Items are 8 copies of 5 vectors (exact 8-way ties across every cut): the torch path equals the harness's
    exact path ("brute", ties by lower id everywhere); above the threshold the harness's FAISS search is used."""
    model = IntegerModel(40)
    rng = np.random.default_rng(0)
    hist = Histories.from_rows([rng.integers(1, 41, size=rng.integers(2, 12)) for _ in range(64)])
    rec = Recommender(model, runtime="torch")
    users = rec.encode(hist).numpy()
    items = model.item_vectors()
    exclude = Exclusions.from_histories(hist, 41)
    for k in (1, 3, 7, 10, 40):
        ids, scores = rec.top_k(hist, k)
        want, want_scores = ItemIndex(items, "brute").search(users, k, exclude)
        assert np.array_equal(ids, want) and np.array_equal(scores, want_scores), k
        assert (ids[:, -1] == -1).all() if k == 40 else (ids > 0).all()
        # the FAISS path is the harness's Flat search itself (which, at exact ties across its search
        # depth, may keep a higher id: FAISS's heap does not order ties)
        flat, _ = ItemIndex(items, "Flat").search(users, k, exclude)
        assert np.array_equal(Recommender(model, torch_max_items=10, runtime="torch").top_k(hist, k)[0], flat)
    want, _ = ItemIndex(items, "brute").search(users, 7)
    assert np.array_equal(rec.top_k(hist, 7, exclude_seen=False)[0], want)


def test_an_onnx_encoder_unlike_the_model_is_refused(tiny_run, tmp_path, monkeypatch, capsys):
    """The parity check: a model.onnx of other weights (here: the first MLP perturbed) is never exported."""
    from distill import export as export_module
    real = export_module.onnx_encoder

    def drifted(model):
        other = copy.deepcopy(model)
        with torch.no_grad():
            w = other.blocks[0].mlp[0].weight
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return real(other)

    monkeypatch.setattr(export_module, "onnx_encoder", drifted)
    out = tmp_path / "drifted"
    assert main(["export", str(tiny_run[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ONNX encoder differs from the torch model" in err and "tolerance 1e-04" in err and err.count("\n") == 1
    assert not out.exists()


def test_repeat_consumption_run_serves_the_protocol_it_was_evaluated_with(toy_data, tiny_llama, tmp_path, capsys):
    """eval.mask_history=false (data with repeats): the harness ranks repeated targets, and the export serves
    that protocol by default, so the served ranks equal test_ranks.npy for every user, repeated targets found."""
    run, out = tmp_path / "run", tmp_path / "export"
    overrides = sets(tiny_recipe_overrides(toy_data, tiny_llama) + ["eval.mask_history=false"])
    assert main(["student", "train", RECIPE, "--out", str(run)] + overrides) == 0
    assert main(["export", str(run), "--out", str(out), "--model", "student_alone"]) == 0
    split = load_split(run / "split")
    ranks = np.load(run / "student_alone" / "test_ranks.npy")
    repeated = repeated_targets(split.history("test"), split.targets("test"))
    assert (ranks[repeated] >= 0).any()           # the protocol decides these users' ranks
    for runtime in ("onnxruntime", "torch"):
        exp = load_export(out, runtime=runtime)
        assert exp.manifest["mask_history"] is False
        assert np.array_equal(served_ranks(exp, split), ranks)
        assert not np.array_equal(served_ranks(exp, split, include_seen=False), ranks)
    assert "history's items stay rankable" in (out / "README.md").read_text()
    history = [split.items[i] for i in split.history("test").row(int(np.flatnonzero(repeated)[0]))]
    capsys.readouterr()
    assert main(["recommend", str(out), "--history", ",".join(history), "-k", "20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == load_export(out).recommend(history, 20, include_seen=True)
    assert main(["recommend", str(out), "--history", ",".join(history), "-k", "20", "--json", "--exclude-seen"]) == 0
    assert not set(it["item"] for it in json.loads(capsys.readouterr().out)["items"]) & set(history)
