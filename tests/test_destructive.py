"""No command destroys finished work, a full disk or an unreadable file is one line, and `anyo verify`
sees every damaged artifact (issue 18).

Most tests share one copy of the tiny run per module (`base`): every command there must fail and leave
every file of the run byte-identical (`digest`). Tests that change a run work on their own copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import RECIPE, sets

from distill.cli import main


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (hidden ones too), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, argv: list[str], fragment: str = "", rc: int = 2) -> str:
    got = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip()]
    assert got == rc, f"exit status {got}, stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("anyo: error: "), err
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def base(tiny_run, tmp_path_factory):
    """The run, and beside it what a user has (files and folders anyo did not write) and evaluate's inputs."""
    from distill.data import load_split
    from distill.exported import EXPORT_KIND
    run = tmp_path_factory.mktemp("destructive") / "run"
    shutil.copytree(tiny_run[0], run)
    mine = run.parent
    split = load_split(run / "split")
    rng = np.random.default_rng(0)
    np.save(mine / "users.npy", rng.normal(size=(split.n_users, 8)).astype(np.float32))
    np.save(mine / "items.npy", rng.normal(size=(split.n_items + 1, 8)).astype(np.float32))
    (mine / "mine.csv").write_text("user,score\nu1,3\n")
    (mine / "link.json").symlink_to(mine / "mine.csv")
    (mine / "handmade").mkdir()
    (mine / "handmade" / "notes.txt").write_text("keep me")
    (mine / "handmade" / "manifest.json").write_text(json.dumps({"kind": EXPORT_KIND, "files": {"notes.txt": "0"}}))
    (mine / "elsewhere").mkdir()
    (mine / "folderlink").symlink_to(mine / "elsewhere", target_is_directory=True)
    data = Path(next(o for o in tiny_run[1] if o.startswith("data.path=")).split("=", 1)[1])
    shutil.copytree(data, mine / "data")
    shutil.copytree(data, mine / "outer" / "data")
    return run, tiny_run[1]


def copy(base, tmp_path: Path, name: str = "c") -> Path:
    shutil.copytree(base[0], tmp_path / name)
    return tmp_path / name


# ---------------------------------------------------------------- commands that must not touch the run

def evaluate(run: Path, out: Path) -> list[str]:
    return ["evaluate", "--split", str(run / "split"), "--user-vectors", str(run.parent / "users.npy"),
            "--item-vectors", str(run.parent / "items.npy"), "--out", str(out)]


DESTRUCTIVE = [
    ("bench-out-run", lambda r, o: ["bench", str(r), "--out", str(r)], "would replace the run folder"),
    ("bench-out-split", lambda r, o: ["bench", str(r), "--out", str(r / "split")], "stage folder"),
    ("bench-out-teacher", lambda r, o: ["bench", str(r), "--out", str(r / "teacher")], "stage folder"),
    ("bench-out-inside-cache", lambda r, o: ["bench", str(r), "--out", str(r / "teacher_cache" / "new")],
     "stage folder"),
    ("bench-out-parent", lambda r, o: ["bench", str(r), "--out", str(r.parent)], "would replace the run folder"),
    ("bench-out-file", lambda r, o: ["bench", str(r), "--out", str(r / "recipe.yaml")], "is a file"),
    ("distill-name-teacher", lambda r, o: ["distill", RECIPE, "--out", str(r), "--name", "teacher"] + sets(o),
     "--name 'teacher'"),
    ("distill-name-empty", lambda r, o: ["distill", RECIPE, "--out", str(r), "--name", ""] + sets(o), "--name ''"),
    ("distill-name-dotdot", lambda r, o: ["distill", RECIPE, "--out", str(r), "--name", "../x"] + sets(o),
     "plain folder name"),
    ("distill-name-split", lambda r, o: ["distill", RECIPE, "--out", str(r), "--name", "split"] + sets(o),
     "plain folder name"),
    ("distill-name-resume", lambda r, o: ["distill", RECIPE, "--out", str(r), "--name", "teacher.resume"] + sets(o),
     "plain folder name"),
    ("evaluate-out-manifest", lambda r, o: ["evaluate", "--split", str(r / "split"), "--user-vectors", "u.npy",
                                            "--item-vectors", "i.npy", "--out", str(r / "split" / "manifest.json")],
     "holds a run's artifacts"),
    ("evaluate-out-folder", lambda r, o: ["evaluate", "--split", str(r / "split"), "--user-vectors", "u.npy",
                                          "--item-vectors", "i.npy", "--out", str(r / "split")], "is a folder"),
    ("prepare-out-file", lambda r, o: ["prepare", RECIPE, "--out", str(r / "recipe.yaml")] + sets(o), "is a file"),
    ("prepare-out-stage", lambda r, o: ["prepare", RECIPE, "--out", str(r / "split")] + sets(o), "is a stage folder"),
    ("train-out-stage", lambda r, o: ["student", "train", RECIPE, "--out", str(r / "student_alone")] + sets(o),
     "is a stage folder"),
    ("merge-without-shards", lambda r, o: ["teacher", "infer", RECIPE, "--out", str(r), "--merge"] + sets(o),
     "no shards to merge"),
    # no command writes over what it did not create (files, symlinks, its own inputs)
    ("evaluate-over-user-file", lambda r, o: evaluate(r, r.parent / "mine.csv"), "not written by `anyo evaluate`"),
    ("evaluate-out-is-user-vectors", lambda r, o: evaluate(r, r.parent / "users.npy"), "is the input --user-vectors"),
    ("evaluate-out-is-item-vectors", lambda r, o: evaluate(r, r.parent / "items.npy"), "is the input --item-vectors"),
    ("evaluate-out-symlink", lambda r, o: evaluate(r, r.parent / "link.json"), "is a symbolic link"),
    ("export-out-handmade-manifest", lambda r, o: ["export", str(r), "--out", str(r.parent / "handmade")],
     "not an anyo export"),
    ("export-out-symlink", lambda r, o: ["export", str(r), "--out", str(r.parent / "folderlink")],
     "is a symbolic link"),
    ("bench-out-symlink", lambda r, o: ["bench", str(r), "--no-cost", "--out", str(r.parent / "folderlink")],
     "is a symbolic link"),
    ("prepare-out-is-data", lambda r, o: ["prepare", RECIPE, "--out", str(r.parent / "data")] + sets(o)
     + ["--set", f"data.path={r.parent / 'data'}"], "is the recipe's input data.path"),
    ("prepare-out-inside-data", lambda r, o: ["prepare", RECIPE, "--out", str(r.parent / "data" / "run")] + sets(o)
     + ["--set", f"data.path={r.parent / 'data'}"], "is inside the recipe's input data.path"),
    ("prepare-out-contains-data", lambda r, o: ["prepare", RECIPE, "--out", str(r.parent / "outer")] + sets(o)
     + ["--set", f"data.path={r.parent / 'outer' / 'data'}"], "contains the recipe's input data.path"),
]


@pytest.mark.parametrize("argv, fragment", [pytest.param(a, f, id=i) for i, a, f in DESTRUCTIVE])
def test_refused_commands_leave_the_run_intact(base, capsys, argv, fragment):
    run, overrides = base
    before = digest(run.parent)
    one_line(capsys, argv(run, overrides), fragment)
    assert digest(run.parent) == before


def test_merge_of_shards_built_with_other_options_leaves_the_cache_whole(base, capsys):
    run, overrides = base
    staging = run / "teacher_cache.partial"
    shutil.copytree(run / "teacher_cache", staging)  # shards written with K=5
    try:
        before = digest(run / "teacher_cache"), (run / "recipe.yaml").read_bytes()
        one_line(capsys, ["teacher", "infer", RECIPE, "--out", str(run), "--merge"] + sets(overrides)
                 + ["--set", "distill.k=3"], "built with other k")
        # the cache, and the recipe the run records, are untouched by the failed command
        assert (digest(run / "teacher_cache"), (run / "recipe.yaml").read_bytes()) == before
    finally:
        shutil.rmtree(staging)


def test_ctrl_c_during_inference_leaves_the_complete_cache_byte_identical(base, tmp_path, monkeypatch, capsys):
    from teacher import infer
    run = copy(base, tmp_path)
    before = digest(run / "teacher_cache")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(infer, "write_shard", interrupted)
    assert main(["teacher", "infer", RECIPE, "--out", str(run)] + sets(base[1]) + ["--set", "distill.k=3"]) == 130
    assert digest(run / "teacher_cache") == before
    assert (run / "recipe.yaml").read_bytes() == (base[0] / "recipe.yaml").read_bytes()
    capsys.readouterr()
    assert main(["distill", RECIPE, "--out", str(run)] + sets(base[1])) == 0  # the old cache still serves
    assert "up to date" in capsys.readouterr().out


# ---------------------------------------------------------------- a full disk

def test_full_disk_mid_write_is_one_line_and_leaves_nothing_partial(base, tmp_path, monkeypatch, capsys):
    """np.save and safetensors fail the way they do on a full disk (no file name; safetensors' Rust
    error is not even an OSError): one line naming the path, exit 2, no temporary file left."""
    import safetensors.numpy

    from distill import artifacts
    run = copy(base, tmp_path)
    shutil.rmtree(run / "mostpop")
    before = digest(run)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    line = one_line(capsys, ["mostpop", RECIPE, "--out", str(run)] + sets(base[1]), "no space left on device")
    assert str(run / "mostpop" / "test_ranks.npy") in line
    assert digest(run) == before and not (run / "mostpop").exists() and not list(run.glob(".mostpop.*"))
    monkeypatch.undo()

    class SafetensorError(Exception):
        pass

    def rust_full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.numpy, "save_file", rust_full)
    monkeypatch.setattr("distill.data.save_file", rust_full)
    shutil.rmtree(run / "split")
    line = one_line(capsys, ["prepare", RECIPE, "--out", str(run)] + sets(base[1]), "no space left on device")
    assert str(run / "split") in line
    assert not (run / "split").exists() and not list(run.glob(".split.*"))
    with pytest.raises(OSError, match="(?i)no space"):  # the same through atomic_file directly
        with artifacts.atomic_file(tmp_path / "x.safetensors") as tmp:
            rust_full(tmp)
    assert not list(tmp_path.glob(".x.safetensors.*"))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs (needs root; skipped where mount is not allowed)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_prepare_into_a_full_disk(tiny_disk, base, capsys):
    try:
        with open(tiny_disk / "filler", "wb", buffering=0) as f:  # fill the disk to its last block
            while True:
                f.write(b"\0" * 4096)
    except OSError:
        pass
    run = tiny_disk / "run"
    line = one_line(capsys, ["prepare", RECIPE, "--out", str(run)] + sets(base[1]), "no space left on device")
    assert str(tiny_disk) in line
    assert not (run / "split").exists() and not list(run.glob(".*.tmp"))


def test_read_only_run_folder_is_one_line(base, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    run = copy(base, tmp_path)
    shutil.rmtree(run / "mostpop")
    run.chmod(0o555)
    try:
        one_line(capsys, ["mostpop", RECIPE, "--out", str(run)] + sets(base[1]), "permission denied")
    finally:
        run.chmod(0o755)


# ---------------------------------------------------------------- a resume state that cannot be read

@pytest.mark.parametrize("damage", ["truncate", "bad-json", "missing-group"])
def test_unreadable_resume_state_is_set_aside_and_training_restarts(base, tmp_path, capsys, damage):
    import torch
    from safetensors.torch import load_file, save_file

    from distill.resume import save_resume
    run = copy(base, tmp_path)
    overrides = base[1] + ["student.epochs=1"]
    shutil.rmtree(run / "student_alone")
    # the reference: the same stage trained from scratch in another folder
    assert main(["student", "train", RECIPE, "--out", str(tmp_path / "ref")] + sets(overrides)) == 0
    reference = json.loads((tmp_path / "ref" / "student_alone" / "metrics.json").read_text())
    state = run / "student_alone.resume"
    save_resume(run / "student_alone", {"current": {"w": torch.zeros(3)}, "rng": {"torch": torch.get_rng_state()}},
                {"inputs": reference["inputs"], "progress": {}, "optimizer": {}, "scheduler": {}, "numpy_rng": {}})
    if damage == "truncate":
        f = state / "state.safetensors"
        f.write_bytes(f.read_bytes()[:-7])
    elif damage == "bad-json":
        (state / "state.json").write_text('{"inputs": ')
    else:
        tensors = load_file(str(state / "state.safetensors"))
        save_file({k: v for k, v in tensors.items() if not k.startswith("rng/")}, str(state / "state.safetensors"))
    capsys.readouterr()
    assert main(["student", "train", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    err = capsys.readouterr().err
    assert "unreadable resume state" in err and "student_alone.resume.broken-1" in err
    assert (run / "student_alone.resume.broken-1").is_dir() and not state.exists()
    record = json.loads((run / "student_alone" / "metrics.json").read_text())
    assert record["metrics"] == reference["metrics"]  # trained from epoch 1, exactly as a fresh run
    capsys.readouterr()
    main(["verify", str(run)])
    lines = {l.split()[0]: l for l in capsys.readouterr().out.splitlines()}
    assert "corrupt" in lines["student_alone.resume.broken-1"]


def test_resume_state_that_does_not_fit_the_model_restarts_cleanly(base, tmp_path, capsys):
    """A state whose tensors do not fit (restore fails half-way): the model is put back as it was."""
    import torch

    from distill.resume import save_resume
    run = copy(base, tmp_path)
    overrides = base[1] + ["student.epochs=1"]
    shutil.rmtree(run / "student_alone")
    assert main(["student", "train", RECIPE, "--out", str(tmp_path / "ref")] + sets(overrides)) == 0
    reference = json.loads((tmp_path / "ref" / "student_alone" / "metrics.json").read_text())
    save_resume(run / "student_alone", {"current": {"model.item_emb.weight": torch.zeros(2, 2)},
                                        "rng": {"torch": torch.get_rng_state(), "order": torch.get_rng_state()}},
                {"inputs": reference["inputs"], "progress": {"epoch": 1}, "optimizer": {"param_groups": []},
                 "scheduler": {}, "numpy_rng": {}})
    capsys.readouterr()
    assert main(["student", "train", RECIPE, "--out", str(run)] + sets(overrides)) == 0
    assert "set aside" in capsys.readouterr().err
    assert json.loads((run / "student_alone" / "metrics.json").read_text())["metrics"] == reference["metrics"]


# ---------------------------------------------------------------- verify sees every damaged artifact

def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])


def _edit_json(key, value):
    def edit(p: Path) -> None:
        record = json.loads(p.read_text())
        node = record
        for k in key[:-1]:
            node = node[k]
        node[key[-1]] = value
        p.write_text(json.dumps(record))
    return edit


def _drop_key(key):
    def edit(p: Path) -> None:
        record = json.loads(p.read_text())
        del record[key]
        p.write_text(json.dumps(record))
    return edit


CORRUPTIONS = [
    ("metrics-list", "student_alone/metrics.json", lambda p: p.write_text("[1, 2]"), "student_alone"),
    ("metrics-truncated", "student_alone/metrics.json", _truncate, "student_alone"),
    ("metrics-no-key", "student_distilled/metrics.json", _drop_key("metrics"), "student_distilled"),
    ("mostpop-edited", "mostpop/metrics.json", _edit_json(("metrics", "NDCG@10"), 0.99), "mostpop"),
    ("ranks-truncated", "student_alone/test_ranks.npy", _truncate, "student_alone"),
    ("ranks-edited", "mostpop/test_ranks.npy", lambda p: np.save(p, np.zeros_like(np.load(p))), "mostpop"),
    ("teacher-json-list", "teacher/teacher.json", lambda p: p.write_text("[]"), "teacher"),
    ("teacher-json-no-hash", "teacher/teacher.json", _drop_key("checkpoint_hash"), "teacher"),
    ("config-list", "student_alone/config.json", lambda p: p.write_text('"x"'), "student_alone"),
    ("config-no-model", "student_distilled/config.json", _drop_key("model"), "student_distilled"),
    ("split-manifest-list", "split/manifest.json", lambda p: p.write_text("[]"), "split"),
    ("split-manifest-no-users", "split/manifest.json", _drop_key("n_users"), "split"),
    ("cache-manifest-truncated", "teacher_cache/manifest.json", _truncate, "teacher_cache"),
    ("report-edited", "report/report.json", _edit_json(("split_hash",), "x"), "report"),
    ("report-md-edited", "report/report.md", lambda p: p.write_text("# nothing\n"), "report"),
    ("recipe-list", "recipe.yaml", lambda p: p.write_text("- 1\n"), "recipe"),
]


@pytest.mark.parametrize("target, damage, row", [pytest.param(t, d, r, id=i) for i, t, d, r in CORRUPTIONS])
def test_verify_reports_each_damaged_artifact_corrupt(base, tmp_path, capsys, target, damage, row):
    run = copy(base, tmp_path)
    damage(run / target)
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    lines = {line.split()[0]: line for line in out.out.splitlines()}
    assert lines[row].split()[1] == "corrupt", out.out


# every artifact `anyo run` can rebuild without retraining: it does; the others fail in one line or rebuild
RUN_AFTER = [c for c in CORRUPTIONS if c[0] in {"mostpop-edited", "ranks-edited", "cache-manifest-truncated",
                                                  "report-edited", "report-md-edited", "split-manifest-list",
                                                  "metrics-no-key", "teacher-json-list"}]


@pytest.mark.parametrize("target, damage", [pytest.param(t, d, id=i) for i, t, d, _ in RUN_AFTER])
def test_run_on_a_damaged_run_rebuilds_or_fails_in_one_line(base, tmp_path, capsys, target, damage):
    run = copy(base, tmp_path)
    damage(run / target)
    capsys.readouterr()
    rc = main(["run", RECIPE, "--out", str(run)] + sets(base[1]))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 0:
        capsys.readouterr()
        assert main(["verify", str(run)]) == 0, capsys.readouterr().out
    else:
        assert rc == 2 and len([l for l in err.splitlines() if l.startswith("anyo: error:")]) == 1, err


def test_bench_refuses_an_edited_record_instead_of_reporting_it(base, tmp_path, capsys):
    run = copy(base, tmp_path)
    _edit_json(("metrics", "NDCG@10"), 0.99)(run / "student_alone" / "metrics.json")
    one_line(capsys, ["bench", str(run), "--no-cost"], "does not match its own sha256")


def test_evaluate_replaces_only_its_own_earlier_output(base, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(evaluate(base[0], out)) == 0
    first = out.read_bytes()
    assert main(evaluate(base[0], out)) == 0 and out.read_bytes() == first  # its own output: rewritten
    _edit_json(("metrics", "NDCG@10"), 0.99)(out)                            # edited by hand: no longer anyo's
    edited = out.read_bytes()
    one_line(capsys, evaluate(base[0], out), "not written by `anyo evaluate`")
    assert out.read_bytes() == edited and [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_a_run_holding_a_symlinked_artifact_is_refused(base, tmp_path, capsys):
    """A stage file replaced by a symbolic link (to an identical copy elsewhere): the commands that write the run
    refuse it, verify calls it corrupt and export refuses it; nothing is written anywhere."""
    run = copy(base, tmp_path)
    outside = tmp_path / "outside.json"
    shutil.copyfile(run / "mostpop" / "metrics.json", outside)
    (run / "mostpop" / "metrics.json").unlink()
    (run / "mostpop" / "metrics.json").symlink_to(outside)
    before = digest(tmp_path)
    for argv in (["mostpop", RECIPE, "--out", str(run)] + sets(base[1]), ["bench", str(run), "--no-cost"],
                 ["export", str(run), "--out", str(tmp_path / "export")]):
        one_line(capsys, argv, "mostpop/metrics.json: is a symbolic link")
    assert digest(tmp_path) == before and not (tmp_path / "export").exists()
    assert main(["verify", str(run)]) == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["mostpop"].split()[1] == "corrupt" and "symbolic link" in lines["mostpop"]


# ---------------------------------------------------------------- every byte that decides an answer is sealed

def _copy_from(source: str):
    def swap(p: Path) -> None:
        shutil.copyfile(p.parents[1] / source, p)
    return swap


def _nan_weights_resealed(p: Path) -> None:
    """NaN in one weight, the stage record resealed over it: a model that trained into NaN, sealed as it was."""
    from safetensors.torch import load_file, save_file

    from distill.artifacts import write_record
    tensors = load_file(str(p))
    tensors["item_emb.weight"][3, 0] = float("nan")
    save_file(tensors, str(p))
    record = json.loads((p.parent / "metrics.json").read_text())
    write_record(p.parent / "metrics.json", record, files=[p.parent / name for name in record["files"]])


def _swap_first_two_rows(p: Path) -> None:
    lines = p.read_text().split("\n")
    a, b = lines[1].split("\t"), lines[2].split("\t")
    a[1], b[1] = b[1], a[1]
    lines[1], lines[2] = "\t".join(a), "\t".join(b)
    p.write_text("\n".join(lines))


def _recipe_set(section: str, key: str, value):
    def edit(p: Path) -> None:
        import yaml
        recipe = yaml.safe_load(p.read_text())
        recipe[section][key] = value
        p.write_text(yaml.safe_dump(recipe))
    return edit


# (id, file, damage, verify row, its state, what the row and export's one line name)
SEALED = [
    ("weights-swapped", "student_distilled/model.safetensors", _copy_from("student_alone/model.safetensors"),
     "student_distilled", "corrupt", "student_distilled/model.safetensors"),
    ("weights-nan", "student_distilled/model.safetensors", _nan_weights_resealed, "student_distilled", "corrupt",
     "student_distilled/model.safetensors: tensor item_emb.weight holds NaN or inf"),
    ("weights-truncated", "student_distilled/model.safetensors", _truncate, "student_distilled", "corrupt",
     "student_distilled/model.safetensors"),
    ("config-edited", "student_distilled/config.json", _edit_json(("seed",), 99), "student_distilled", "corrupt",
     "student_distilled/config.json"),
    ("metrics-edited", "student_distilled/metrics.json", _edit_json(("metrics", "NDCG@10"), 0.99),
     "student_distilled", "corrupt", "student_distilled/metrics.json"),
    ("teacher-json-edited", "teacher/teacher.json", _edit_json(("seed",), 99), "teacher", "corrupt",
     "teacher/teacher.json"),
    ("items-tsv-edited", "split/items.tsv", _swap_first_two_rows, "split", "corrupt", "split/items.tsv"),
    ("users-tsv-edited", "split/users.tsv", _swap_first_two_rows, "split", "corrupt", "split/users.tsv"),
    ("split-manifest-edited", "split/manifest.json", _edit_json(("n_interactions",), 1), "split", "corrupt",
     "split/manifest.json"),
    ("report-figure-swapped", "report/quality.png", _copy_from("report/curves.png"), "report", "corrupt",
     "report/quality.png"),
    ("recipe-did-not-train-it", "recipe.yaml", _recipe_set("student", "epochs", 4), "student_alone", "stale",
     "student_alone/metrics.json: built from other inputs"),
]


@pytest.mark.parametrize("target, damage, row, state, names",
                         [pytest.param(*c[1:], id=c[0]) for c in SEALED])
def test_verify_and_export_name_each_damaged_artifact(base, tmp_path, capsys, target, damage, row, state, names):
    """verify calls the artifact corrupt (or stale) and names the file; export refuses the run in one line naming
    it and writes nothing."""
    run = copy(base, tmp_path)
    damage(run / target)
    capsys.readouterr()
    assert main(["verify", str(run)]) == 1
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines[row].split()[1] == state and names in lines[row], lines
    one_line(capsys, ["export", str(run), "--out", str(tmp_path / "export")], names)
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".export*"))
