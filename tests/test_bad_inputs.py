"""Every bad input a user can give (recipe, `--set`, command-line numbers, data files, vectors)
ends in one line on stderr and exit status 2, never a traceback, and the line names the
key, file, line or byte that is wrong.

Each table row is (id, the bad input, a fragment the one line must contain). The rows run
through `distill.cli.main` in process, as `anyo prepare` (which loads the recipe, then reads
the data), except where the row says otherwise.
"""

from __future__ import annotations

import re
import threading

import numpy as np
import pytest
import torch
from helpers import RECIPE, sets, write_dataset

from distill.cli import main
from distill.config import load_recipe
from distill.errors import ConfigError


def expect_one_line_error(capsys, argv: list[str], fragment: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip()]
    assert rc == 2, f"exit status {rc}, stderr: {err}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("anyo: error: ")
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("toy"))


def toy_sets(folder) -> list[str]:
    return sets([f"data.path={folder}", "data.name=toy"])


# ---------------------------------------------------------------- the recipe file

def alias_bomb(levels: int = 12, width: int = 10) -> str:
    """The "billion laughs" inside a known key: 10^12 strings once expanded."""
    lines = ["teacher:", "  lora_r: 8", f"  target_modules: &l0 [{', '.join(['q_proj'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"  instruction: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


RECIPE_CASES = [
    ("non-utf8", b"student:\n  lr: 0.1\n  # caf\xe9\n", "not valid UTF-8 at byte offset 26 (line 3)"),
    ("utf16", "student:\n  lr: 0.1\n".encode("utf-16"), "starts with a UTF-16 byte-order mark"),
    ("empty file", b"", "empty recipe"),
    ("only comments", b"# nothing here\n\n", "empty recipe (only comments"),
    ("a list", b"- student\n- teacher\n", "expected a mapping of sections (data, student, ...), got list"),
    ("a scalar", b"hello\n", "expected a mapping of sections (data, student, ...), got str"),
    ("unknown section", b"studnet:\n  lr: 0.1\n", "studnet: unknown key"),
    ("unknown key", b"student:\n  learning_rate: 0.1\n", "student.learning_rate: unknown key"),
    ("section not a mapping", b"student: 5\n", "student: expected a mapping, got int"),
    ("invalid YAML", b"student: [1,\n", "invalid YAML"),
    ("tab indentation", b"student:\n\tlr: 0.1\n", "invalid YAML"),
    ("python tag", b"student: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
    ("alias", b"student:\n  lr: &x 0.1\n  weight_decay: *x\n", "line 3: YAML aliases (*name) are not allowed"),
    ("merge key", b"student: &s {lr: 0.1}\nteacher:\n  <<: *s\n", "YAML aliases"),
    ("alias bomb in a known key", alias_bomb().encode(), "YAML aliases (*name) are not allowed"),
    ("duplicate key", b"student:\n  lr: 0.1\n  lr: 0.2\n", "line 3: duplicate key 'lr'"),
    ("duplicate section", b"student:\n  lr: 0.1\nstudent:\n  epochs: 3\n", "line 3: duplicate key 'student'"),
    ("deep nesting", b"student: " + b"[" * 20000 + b"]" * 20000 + b"\n", "nested too deeply"),
    # the key named is the one that is wrong (epochs used to be reported as batch_size)
    ("epochs 0 in the file", b"student:\n  epochs: 0\n", "student.epochs: must be >= 1, got 0"),
    ("patience 0 in the file", b"student:\n  patience: 0\n", "student.patience: must be >= 1, got 0"),
    ("teacher grad_accum 0", b"teacher:\n  grad_accum: 0\n", "teacher.grad_accum: must be >= 1, got 0"),
    ("yaml nan", b"teacher:\n  lr: .nan\n", "teacher.lr: must be a finite number, got nan"),
    ("top-level seed", b"seed: -3\n", "seed: must be >= 0, got -3"),
]


@pytest.mark.parametrize("text,fragment", [c[1:] for c in RECIPE_CASES], ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_file(tmp_path, toy, capsys, text, fragment):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(text)
    line = expect_one_line_error(capsys, ["prepare", str(recipe), "--out", str(tmp_path / "run")] + toy_sets(toy),
                                 fragment)
    assert str(recipe) in line  # the file is named too


def test_missing_recipe_and_folder_recipe(tmp_path, capsys):
    expect_one_line_error(capsys, ["prepare", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "r")],
                          "recipe file not found")
    expect_one_line_error(capsys, ["prepare", str(tmp_path), "--out", str(tmp_path / "r")], ": not a file")


def test_a_utf8_bom_is_accepted(tmp_path):
    """Chosen behaviour (README): a UTF-8 byte-order mark before a recipe is allowed by YAML and accepted."""
    recipe = tmp_path / "bom.yaml"
    recipe.write_bytes(b"\xef\xbb\xbfstudent:\n  epochs: 3\n")
    assert load_recipe(recipe).student.epochs == 3


def test_alias_bomb_is_refused_without_expanding_it(tmp_path):
    """Expanding it (e.g. hashing the recipe) would never finish; a regression hangs the thread,
    and the generous join below turns that into a failure instead of a hung suite."""
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(alias_bomb(levels=15))
    outcome = []

    def load():
        try:
            load_recipe(recipe)
            outcome.append("loaded")
        except ConfigError as e:
            outcome.append(str(e))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert outcome and "YAML aliases" in outcome[0], outcome or "still expanding the alias bomb after 120 s"


def test_an_unknown_key_with_a_bomb_is_refused_too():
    with pytest.raises(ConfigError, match="aliases"):
        load_recipe(None, ["teacher.nope=[&a [x, x], *a]"])


# ---------------------------------------------------------------- values (`--set`, same checks as the file)

BIG = "1" + "0" * 400

SET_CASES = [
    # one check per field, the right key in the message
    ("student epochs 0", ["student.epochs=0"], "student.epochs: must be >= 1, got 0"),
    ("student epochs negative", ["student.epochs=-5"], "student.epochs: must be >= 1, got -5"),
    ("teacher epochs 0", ["teacher.epochs=0"], "teacher.epochs: must be >= 1, got 0"),
    ("distill epochs negative", ["distill.epochs=-1"], "distill.epochs: must be >= 1, got -1"),
    ("examples 0", ["teacher.examples_per_epoch=0"], "teacher.examples_per_epoch: must be >= 1, got 0"),
    ("student batch 0", ["student.batch_size=0"], "student.batch_size: must be >= 1, got 0"),
    ("teacher batch negative", ["teacher.batch_size=-4"], "teacher.batch_size: must be >= 1, got -4"),
    ("eval batch 0", ["teacher.eval_batch_size=0"], "teacher.eval_batch_size: must be >= 1, got 0"),
    ("shard users 0", ["distill.shard_users=0"], "distill.shard_users: must be >= 1, got 0"),
    ("student negatives 0", ["student.loss=sampled", "student.num_negatives=0"],
     "student.num_negatives: must be >= 1, got 0"),
    ("teacher negatives 0", ["teacher.loss=sampled", "teacher.num_negatives=0"],
     "teacher.num_negatives: must be >= 1, got 0"),
    ("pairwise negatives 0", ["distill.pairwise_negatives=0"], "distill.pairwise_negatives: must be >= 1, got 0"),
    ("student layers negative", ["student.num_layers=-1"], "student.num_layers: must be >= 1, got -1"),
    ("student layers 0", ["student.num_layers=0"], "student.num_layers: must be >= 1, got 0"),
    ("teacher layers 0", ["teacher.num_layers=0"], "teacher.num_layers: must be >= 1, got 0"),
    ("heads 0", ["student.num_heads=0"], "student.num_heads: must be >= 1, got 0"),
    ("hidden 0", ["student.hidden_size=0"], "student.hidden_size: must be >= 1, got 0"),
    ("max history 0", ["teacher.max_history=0"], "teacher.max_history: must be >= 1, got 0"),
    ("lora alpha 0", ["teacher.lora_alpha=0"], "teacher.lora_alpha: must be >= 1, got 0"),
    ("experts 0", ["teacher.num_experts=0"], "teacher.num_experts: must be >= 1, got 0"),
    ("positions 0", ["distill.positions=0"], "distill.positions: must be >= 1, got 0"),
    ("negative k", ["distill.k=-1"], "distill.k: must be >= 1, got -1"),
    ("min interactions negative", ["data.min_interactions=-1"], "data.min_interactions: must be >= 0, got -1"),
    # seeds
    ("seed negative", ["seed=-1"], "seed: must be >= 0, got -1"),
    ("data seed negative", ["data.seed=-5"], "data.seed: must be >= 0, got -5"),
    ("seed overflow", ["seed=1180591620717411303424"], "seed: must be <= 4294967295"),
    # ints too large, wrong types
    ("int overflow", ["student.epochs=1099511627776"], "student.epochs: must be <= 2147483647"),
    ("float for int", ["student.epochs=1.5"], "student.epochs: expected int, got float 1.5"),
    ("bool for int", ["student.epochs=true"], "student.epochs: expected int, got bool True"),
    ("int for bool", ["teacher.use_titles=1"], "teacher.use_titles: expected bool, got int 1"),
    ("word for float", ["student.lr=fast"], "student.lr: expected float, got str 'fast'"),
    ("null for float", ["student.lr=null"], "student.lr: expected float, got NoneType None"),
    # floats must be finite
    ("nan lr", ["student.lr=.nan"], "student.lr: must be a finite number, got nan"),
    ("nan lr as a word", ["teacher.lr=nan"], "teacher.lr: must be a finite number, got nan"),
    ("inf lr", ["student.lr=.inf"], "student.lr: must be a finite number, got inf"),
    ("1e400 overflows", ["student.lr=1e400"], "student.lr: must be a finite number, got inf"),
    ("huge int for float", [f"student.lr={BIG}"], "student.lr: 1000000000"),
    ("nan weight decay", ["teacher.weight_decay=.nan"], "teacher.weight_decay: must be a finite number"),
    ("nan temperature", ["distill.temperature=.nan"], "distill.temperature: must be a finite number"),
    ("inf kd weight", ["distill.kd_weight=.inf"], "distill.kd_weight: must be a finite number"),
    ("nan cf weight", ["teacher.cf_weights=[0.5, .nan]"], "teacher.cf_weights[1]: must be a finite number"),
    ("lr 0", ["student.lr=0"], "student.lr: must be > 0.0, got 0.0"),
    ("negative weight decay", ["student.weight_decay=-0.1"], "student.weight_decay: must be >= 0.0, got -0.1"),
    ("temperature 0", ["teacher.temperature=0"], "teacher.temperature: must be > 0.0"),
    ("pairwise lambda 0", ["distill.pairwise_lambda=0"], "distill.pairwise_lambda: must be > 0.0"),
    ("negative weight", ["distill.align_weight=-1"], "distill.align_weight: must be >= 0.0, got -1.0"),
    ("dropout 1", ["student.dropout=1"], "student.dropout: must be < 1.0, got 1.0"),
    ("lora dropout negative", ["teacher.lora_dropout=-0.5"], "teacher.lora_dropout: must be >= 0.0"),
    ("warmup 1.5", ["teacher.warmup_ratio=1.5"], "teacher.warmup_ratio: must be < 1.0"),
    # eval.ks
    ("ks without 10", ["eval.ks=[1, 5, 20]"], "eval.ks: must include 10"),
    ("ks [0]", ["eval.ks=[0]"], "eval.ks[0]: must be >= 1, got 0"),
    ("ks negative", ["eval.ks=[-10, 10]"], "eval.ks[0]: must be >= 1, got -10"),
    ("ks empty", ["eval.ks=[]"], "eval.ks: must not be empty"),
    ("ks float", ["eval.ks=[10, 2.5]"], "eval.ks[1]: expected int, got float 2.5"),
    ("ks not a list", ["eval.ks=10"], "eval.ks: expected list, got int 10"),
    # choices and strings
    ("dtype", ["teacher.dtype=float8"], "teacher.dtype: must be float32 or bfloat16 or float16, got 'float8'"),
    ("loss", ["student.loss=bpr"], "student.loss: must be full or sampled, got 'bpr'"),
    ("backends", ["bench.teacher_backends=[hf, vllm]"], "bench.teacher_backends[1]: must be hf or deepspeed"),
    ("no target modules", ["teacher.target_modules=[]"], "teacher.target_modules: must not be empty"),
    ("a target module not a string", ["teacher.target_modules=[q_proj, 3]"],
     "teacher.target_modules[1]: expected str, got int 3"),
    ("empty query text", ["teacher.query_text=''"], "teacher.query_text: must not be empty"),
    ("empty data path", ["data.path=''"], "data.path: must not be empty"),
    ("heads do not divide", ["student.num_heads=3"], "student.num_heads: hidden_size 64 is not divisible by num_heads 3"),
    ("experts do not divide", ["teacher.num_experts=3"], "teacher.num_experts: num_experts 3 must divide lora_r 8"),
    ("text tower without CED", ["distill.ced_text_rows=all"], "distill.ced_text_rows: needs distill.ced_weight > 0"),
    # FAISS strings that cannot be built for the item vectors' dimension
    ("index PQ7", ["eval.index=PQ7"], "eval.index: cannot build 'PQ7' for 64-dimensional vectors"),
    ("index garbage", ["eval.index=NotAnIndex"], "eval.index: cannot build 'NotAnIndex'"),
    # the --set syntax itself
    ("not valid YAML", ["student.lr=[1,"], "--set student.lr: value '[1,' is not valid YAML"),
    ("unbalanced quote", ["teacher.instruction='abc"], "--set teacher.instruction: value \"'abc\" is not valid YAML"),
    ("alias in a value", ["teacher.target_modules=[&a q_proj, *a]"], "--set teacher.target_modules: value"),
    ("no equals sign", ["student.lr"], "--set student.lr: expected KEY=VALUE"),
    ("empty key", ["=3"], "--set =3: KEY must be dotted names"),
    ("empty part", ["student..lr=3"], "--set student..lr=3: KEY must be dotted names"),
    ("through a value", ["student.lr.x=1"], "--set student.lr.x: lr is not a section"),
    ("unknown key", ["student.hiden_size=3"], "student.hiden_size: unknown key"),
    ("section replaced by a value", ["student=5"], "student: expected a mapping, got int"),
]


@pytest.mark.parametrize("overrides,fragment", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_bad_value(tmp_path, toy, capsys, overrides, fragment):
    expect_one_line_error(capsys, ["prepare", RECIPE, "--out", str(tmp_path / "run")] + toy_sets(toy) + sets(overrides),
                          fragment)


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("2e2", 200.0), (" 1e-3", 1e-3)])
def test_float_written_without_a_dot_is_accepted(text, value):
    """YAML 1.1 reads `1e-3` as a string; a float field takes it."""
    assert load_recipe(RECIPE, [f"student.lr={text}"]).student.lr == value
    if value <= 1:
        assert load_recipe(RECIPE, [f"teacher.cf_weights=[0, {text}]"]).teacher.cf_weights == [0, value]


def test_null_section_means_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("student:\n  # all commented out\nseed: 1\n")
    r = load_recipe(recipe, ["student.epochs=4"])
    assert r.student.epochs == 4 and r.seed == 1


# ---------------------------------------------------------------- command-line numbers

def test_bad_command_line_numbers(tmp_path, toy, capsys):
    out = ["--out", str(tmp_path / "run")]
    expect_one_line_error(capsys, ["run", RECIPE, *out, "--seeds", "0"] + toy_sets(toy), "--seeds: must be >= 1, got 0")
    expect_one_line_error(capsys, ["run", RECIPE, *out, "--seeds", "-2"] + toy_sets(toy), "--seeds: must be >= 1")
    expect_one_line_error(capsys, ["student", "train", RECIPE, *out, "--seed", "-1"] + toy_sets(toy),
                          "--seed: must be in [0, 4294967295], got -1")
    expect_one_line_error(capsys, ["teacher", "infer", RECIPE, *out, "--k", "-3"] + toy_sets(toy),
                          "distill.k: must be >= 1, got -3")
    expect_one_line_error(capsys, ["teacher", "infer", RECIPE, *out, "--positions", "0"] + toy_sets(toy),
                          "distill.positions: must be >= 1, got 0")
    assert not (tmp_path / "run").exists()  # refused before anything ran


# ---------------------------------------------------------------- data files

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"


def good_inter(n_users: int = 10, n_items: int = 30) -> list[str]:
    lines = [HEADER]
    for u in range(n_users):
        for t in range(6):
            lines.append(f"u{u}\ti{(3 * u + t) % n_items + 1}\t3\t{1000 + t}")
    return lines


def good_item(n_items: int = 30) -> list[str]:
    return ["item_id:token\tmovie_title:token_seq\trelease_year:token"] + [
        f"i{i}\tmovie number {i}\t1990" for i in range(1, n_items + 1)]


def text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def replace(lines: list[str], n: int, line: str) -> list[str]:
    """`lines` with file line `n` (1-based) replaced."""
    return lines[: n - 1] + [line] + lines[n:]


SEPARATORS = {"U+2028": "\u2028", "U+2029": "\u2029", "NEL": "\x85", "form feed": "\x0c", "VT": "\x0b",
              "record separator": "\x1e", "file separator": "\x1c"}

DATA_CASES = [
    ("inter BOM", "inter", b"\xef\xbb\xbf" + text(good_inter()),
     "toy.inter:1: starts with a byte-order mark (BOM)"),
    ("item BOM", "item", b"\xef\xbb\xbf" + text(good_item()), "toy.item:1: starts with a byte-order mark (BOM)"),
    ("inter UTF-16", "inter", "\n".join(good_inter()).encode("utf-16"), "toy.inter:1: starts with a UTF-16"),
    ("inter not UTF-8", "inter", text(good_inter()[:3]) + b"u9\ti\xff\t3\t5\n", "toy.inter:4: not valid UTF-8"),
    ("item not UTF-8", "item", text(good_item()[:6]) + b"i40\tcaf\xe9\t1990\n", "toy.item:7: not valid UTF-8"),
    ("empty inter", "inter", b"", "toy.inter:1: empty file"),
    ("blank first line", "inter", b"\n" + text(good_inter()), "toy.inter:1: empty file"),
    ("only a header", "inter", text([HEADER]), "toy.inter:2: no interactions after the header"),
    ("no item_id", "inter", text([HEADER.replace("item_id", "movie_id")] + good_inter()[1:]),
     "toy.inter:1: header has no `item_id` column"),
    ("repeated column", "inter", text([HEADER + "\tuser_id:token"] + [l + "\tx" for l in good_inter()[1:]]),
     "toy.inter:1: header repeats column `user_id`"),
    ("missing field", "inter", text(replace(good_inter(), 5, "u1\ti2\t3")),
     "toy.inter:5: expected 4 tab-separated fields, got 3"),
    ("bad timestamp", "inter", text(replace(good_inter(), 7, "u1\ti2\t3\tyesterday")),
     "toy.inter:7: timestamp 'yesterday' is not a number"),
    ("infinite timestamp", "inter", text(replace(good_inter(), 8, "u1\ti2\t3\tinf")),
     "toy.inter:8: timestamp 'inf' is not finite"),
    ("item missing field", "item", text(replace(good_item(), 4, "i3")),
     "toy.item:4: expected 3 tab-separated fields, got 1"),
    ("too few items", "inter", text(good_inter(n_items=12)), "12 items; the candidate protocol needs at least 21"),
    ("no item_id in item file", "item", text(["id:token\ttitle:token_seq"] + good_item()[1:]),
     "toy.item:1: header has no `item_id` column"),
    ("empty item token", "inter", text(replace(good_inter(), 5, "u1\t\t3\t1000")), "toy.inter:5: empty item_id"),
    ("NUL in a user token", "inter", text(replace(good_inter(), 6, "u1\x00\ti2\t3\t1000")),
     "column `user_id` (data.columns.user) row 5: holds a NUL character"),
] + [
    # a line break character inside a title or token is not a line break: later line numbers stay exact
    (f"{name} in a title", "item",
     text(replace(replace(good_item(), 3, f"i2\tthe{sep}sequel\t1990"), 9, "i8\tno year")),
     "toy.item:9: expected 3 tab-separated fields, got 2")
    for name, sep in SEPARATORS.items()
] + [
    (f"{name} in a user token", "inter",
     text(replace(replace(good_inter(), 4, f"u2{sep}x\ti3\t3\t1000"), 11, "u1\ti2\t3\tlater")),
     "toy.inter:11: timestamp 'later' is not a number")
    for name, sep in list(SEPARATORS.items())[:3]
]


@pytest.mark.parametrize("which,content,fragment", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_file(tmp_path, capsys, which, content, fragment):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "toy.inter").write_bytes(text(good_inter()))
    (folder / "toy.item").write_bytes(text(good_item()))
    (folder / f"toy.{which}").write_bytes(content)
    expect_one_line_error(capsys, ["prepare", RECIPE, "--out", str(tmp_path / "run")] + toy_sets(folder), fragment)


def test_missing_data_file_and_title_column(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    expect_one_line_error(capsys, ["prepare", RECIPE, "--out", str(tmp_path / "run")] + toy_sets(folder),
                          "toy.inter: file not found")
    (folder / "toy.inter").write_bytes(text(good_inter()))
    (folder / "toy.item").write_bytes(text(good_item()))
    expect_one_line_error(capsys, ["prepare", RECIPE, "--out", str(tmp_path / "run")] + toy_sets(folder)
                          + sets(["data.title_field=name"]), "toy.item:1: title column `name` not in header")


def test_crlf_and_line_separators_in_titles_are_read_as_data(tmp_path, capsys):
    """Not errors: Windows line ends, and U+2028 / NEL inside a title, which stays whole."""
    folder = tmp_path / "data"
    folder.mkdir()
    items = replace(good_item(), 3, "i2\tthe\u2028sequel\x85two\t1990")
    (folder / "toy.inter").write_bytes("\r\n".join(good_inter()).encode() + b"\r\n")
    (folder / "toy.item").write_bytes("\r\n".join(items).encode() + b"\r\n")
    assert main(["prepare", RECIPE, "--out", str(tmp_path / "run")] + toy_sets(folder)) == 0
    from distill.data import load_split
    split = load_split(tmp_path / "run" / "split")
    assert split.titles[split.items.index("i2")] == "the\u2028sequel\x85two"
    assert split.titles[split.items.index("i3")] == "movie number 3"  # no \r left on the last column


# ---------------------------------------------------------------- vectors and FAISS index strings

@pytest.fixture(scope="module")
def prepared(tmp_path_factory, toy):
    run = tmp_path_factory.mktemp("prepared")
    assert main(["prepare", RECIPE, "--out", str(run)] + toy_sets(toy)) == 0
    from distill.data import load_split
    return run / "split", load_split(run / "split")


def evaluate_argv(tmp_path, split_dir, users, items, *extra) -> list[str]:
    np.save(tmp_path / "users.npy", users)
    np.save(tmp_path / "items.npy", items)
    return ["evaluate", "--split", str(split_dir), "--user-vectors", str(tmp_path / "users.npy"),
            "--item-vectors", str(tmp_path / "items.npy"), "--out", str(tmp_path / "m.json"), *extra]


def test_float64_vectors_beyond_float32_are_refused(tmp_path, prepared, capsys):
    split_dir, split = prepared
    rng = np.random.default_rng(0)
    users = rng.normal(size=(split.n_users, 16))
    items = rng.normal(size=(split.n_items + 1, 16))
    users[7, 3] = 1e300  # finite in float64, inf in float32
    line = expect_one_line_error(capsys, evaluate_argv(tmp_path, split_dir, users, items),
                                 "row 7 holds a value beyond the float32 range")
    assert "users.npy" in line
    users[7, 3] = 1.0
    items[5, 0] = -1e39
    expect_one_line_error(capsys, evaluate_argv(tmp_path, split_dir, users, items), "items.npy: row 5 holds a value")
    items[5, 0] = 1.0
    assert main(evaluate_argv(tmp_path, split_dir, users, items)) == 0


@pytest.mark.parametrize("index,fragment", [
    ("IVF4096,Flat", "cannot be trained on the catalogue's"),
    ("IVF64,PQ4x8", "cannot be trained on the catalogue's"),
    ("PQ64", "cannot build it for 16-dimensional vectors: The dimension of the vector (d) should be a multiple"),
    ("Nonsense", "could not parse index string Nonsense"),
])
def test_index_that_cannot_work_on_the_catalogue(tmp_path, prepared, capsys, index, fragment):
    split_dir, split = prepared
    rng = np.random.default_rng(0)
    argv = evaluate_argv(tmp_path, split_dir, rng.normal(size=(split.n_users, 16)),
                         rng.normal(size=(split.n_items + 1, 16)), "--index", index)
    line = expect_one_line_error(capsys, argv, fragment)
    assert "eval.index / --index" in line and "Error in" not in line


# ---------------------------------------------------------------- components refuse what the recipe refuses

def test_sampled_softmax_refuses_zero_negatives():
    """With no negatives the sampled loss is -log(1) = 0 and nothing trains (exit 0, a useless model)."""
    from distill.losses.softmax import NegativeSampler, SoftmaxLoss
    for num in (0, -3):
        with pytest.raises(ConfigError, match="at least 1 negative"):
            NegativeSampler(50, num)
    with pytest.raises(ConfigError, match="temperature"):
        SoftmaxLoss(float("nan"))
    loss = SoftmaxLoss(sampler=NegativeSampler(50, 1))

    class Inputs:
        hidden = torch.ones(4, 8)
        targets = torch.tensor([1, 2, 3, 4])
        item_table = torch.randn(51, 8)
    assert loss(Inputs()).item() > 0


class StubTokenizer:
    pad_token_id, bos_token_id = 0, None

    def add_special_tokens(self, _):
        pass

    def convert_tokens_to_ids(self, _):
        return 1

    def __call__(self, text, add_special_tokens=False):
        if isinstance(text, list):
            return {"input_ids": [[] for _ in text]}
        return {"input_ids": [] if text.strip() == "~" else [2, 3]}


def test_prompt_with_a_query_text_of_no_tokens_is_a_config_error():
    from distill.config import TeacherConfig
    from teacher.prompt import PromptBuilder
    with pytest.raises(ConfigError, match="teacher.query_text: '~' gives no tokens"):
        PromptBuilder(StubTokenizer(), ["", "a"], TeacherConfig(query_text="~"))


def test_expert_gate_config_errors():
    from peft import LoraConfig, get_peft_model

    from teacher.moe_lora import ExpertGate

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.other = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="teacher.num_experts: num_experts 3 must divide lora_r 8"):
        ExpertGate(get_peft_model(Tiny(), LoraConfig(r=8, target_modules=["q_proj"])), 4, 3, 8)
    with pytest.raises(ConfigError, match="teacher.target_modules: no LoRA layer"):
        ExpertGate(Tiny(), 4, 2, 8)


def test_backbone_refuses_zero_layers(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    from teacher.backbone import load_backbone
    with pytest.raises(ConfigError, match="teacher.num_layers: must be >= 1, got 0"):
        load_backbone(str(tmp_path), 0)


# ---------------------------------------------------------------- Parquet / CSV / JSONL columns (issue 25)

def interactions(n_users: int = 8, n_items: int = 25) -> list[tuple]:
    return [(f"u{u}", f"i{(3 * u + t) % n_items}", 1000 + t) for u in range(n_users) for t in range(6)]


def parquet(columns: dict) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


def good_columns(**replaced) -> dict:
    users, items, times = (list(c) for c in zip(*interactions()))
    return {"user_id": users, "item_id": items, "timestamp": times, **replaced}


def csv_text(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def good_csv() -> list[str]:
    return ["user_id,item_id,timestamp"] + [f"{u},{i},{t}" for u, i, t in interactions()]


def good_jsonl() -> list[str]:
    import json
    return [json.dumps({"user_id": u, "item_id": i, "timestamp": t}) for u, i, t in interactions()]


def with_row(rows: list, n: int, value):
    """`rows` with element n (0-based) replaced."""
    return rows[:n] + [value] + rows[n + 1:]


COLUMN_CASES = [
    ("list column as item id", "parquet",
     parquet(good_columns(item_id=[[i] for i in good_columns()["item_id"]])), "(data.columns.item) holds list"),
    ("float item ids", "parquet", parquet(good_columns(item_id=[float(i) for i in range(48)])),
     "(data.columns.item) holds double; ids must be strings or integers"),
    ("bool user ids", "parquet", parquet(good_columns(user_id=[u % 2 == 0 for u in range(48)])),
     "(data.columns.user) holds bool"),
    ("struct user ids", "parquet", parquet(good_columns(user_id=[{"a": u} for u in range(48)])),
     "(data.columns.user) holds struct"),
    ("null item id", "parquet", parquet(good_columns(item_id=with_row(good_columns()["item_id"], 3, None))),
     "column `item_id` (data.columns.item) row 4: empty value"),
    ("empty item id in a csv", "csv", csv_text(with_row(good_csv(), 5, "u0,,1004")),
     "column `item_id` (data.columns.item) row 5: empty value"),
    ("NaN float time", "parquet", parquet(good_columns(timestamp=with_row([float(t) for t in good_columns()["timestamp"]],
                                                                          2, float("nan")))),
     "column `timestamp` (data.columns.time) row 3: timestamp nan is not finite"),
    ("word as a csv time", "csv", csv_text(with_row(good_csv(), 7, "u1,i4,yesterday")),
     "column `timestamp` (data.columns.time) row 7: 'yesterday' is not a number or a date-time"),
    ("bad date in a csv time", "csv", csv_text(["user_id,item_id,timestamp"] + [
        f"{u},{i},2026-01-{1 + t % 28:02d}" for u, i, t in interactions()][:9] + ["u1,i4,2026-13-01"]),
     "row 10: '2026-13-01' is not a number or a date-time"),
    ("list as a time", "parquet", parquet(good_columns(timestamp=[[t] for t in good_columns()["timestamp"]])),
     "(data.columns.time) holds list"),
    ("ragged csv row", "csv", csv_text(with_row(good_csv(), 4, "u0,i3,1003,extra")),
     "d.csv:5: expected 3 comma-separated fields, got 4"),
    ("csv not UTF-8", "csv", csv_text(good_csv()[:3]) + b"u9,caf\xe9,5\n", "d.csv:4: not valid UTF-8"),
    ("jsonl not JSON", "jsonl", csv_text(with_row(good_jsonl(), 2, '{"user_id": "u0", ')), "d.jsonl:3: not valid JSON"),
    ("jsonl line not an object", "jsonl", csv_text(with_row(good_jsonl(), 1, '["u0", "i1", 5]')),
     "d.jsonl:2: expected a JSON object, got an array"),
    ("jsonl id is an array", "jsonl", csv_text(with_row(good_jsonl(), 1, '{"user_id": "u0", "item_id": ["i1"], '
                                                                         '"timestamp": 5}')),
     "d.jsonl:2: item_id (data.columns.item) is an array, expected a string or a number"),
    ("jsonl null id", "jsonl", csv_text(with_row(good_jsonl(), 1, '{"user_id": null, "item_id": "i1", "timestamp": 5}')),
     "d.jsonl:2: user_id (data.columns.user) is null"),
    ("jsonl key missing", "jsonl", csv_text(with_row(good_jsonl(), 3, '{"user_id": "u0", "item_id": "i1"}')),
     "d.jsonl:4: no key `timestamp` (data.columns.time)"),
    ("jsonl bool time", "jsonl", csv_text(with_row(good_jsonl(), 3, '{"user_id": "u0", "item_id": "i1", '
                                                                    '"timestamp": true}')),
     "d.jsonl:4: timestamp (data.columns.time) is true, expected a number or a date-time"),
]


@pytest.mark.parametrize("fmt,content,fragment", [c[1:] for c in COLUMN_CASES], ids=[c[0] for c in COLUMN_CASES])
def test_bad_data_column(tmp_path, capsys, fmt, content, fragment):
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(content)
    line = expect_one_line_error(capsys, ["prepare", RECIPE, "--out", str(tmp_path / "run")]
                                 + sets([f"data.format={fmt}", f"data.path={path}"]), fragment)
    assert str(path) in line and "Traceback" not in line and not (tmp_path / "run" / "split").exists()


# ---------------------------------------------------------------- numbers that cannot overflow silently (issue 25)

def npy_claiming(shape: tuple, payload: bytes) -> bytes:
    """A .npy file whose header claims `shape` (float32) over `payload` bytes."""
    import io
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return head.getvalue() + payload


def test_inner_products_beyond_float32_are_refused(tmp_path, prepared, capsys):
    """Every value fits float32, but 1e20 x 1e20 does not: the scores would be inf and the ranks arbitrary."""
    split_dir, split = prepared
    rng = np.random.default_rng(0)
    users = rng.normal(size=(split.n_users, 16)).astype(np.float32)
    items = rng.normal(size=(split.n_items + 1, 16)).astype(np.float32)
    users[4] *= 1e20
    items[9] *= 1e20
    line = expect_one_line_error(capsys, evaluate_argv(tmp_path, split_dir, users, items),
                                 "inner products overflow float32")
    assert "users.npy row 4" in line and "items.npy row 9" in line


@pytest.mark.parametrize("which,array,fragment", [
    ("users", "empty", "users.npy: 0 rows, expected"),
    ("items", "no columns", "items.npy: dimension 0"),
    ("users", "claims 2^40 rows", "users.npy: holds 64 bytes of data, its header claims (1099511627776, 16)"),
    ("items", "truncated", "items.npy: holds 64 bytes of data, its header claims"),
    ("items", "NaN", "items.npy: row 3 contains NaN or inf"),
])
def test_bad_vector_files(tmp_path, prepared, capsys, which, array, fragment):
    split_dir, split = prepared
    rng = np.random.default_rng(0)
    vectors = {"users": rng.normal(size=(split.n_users, 16)), "items": rng.normal(size=(split.n_items + 1, 16))}
    rows = vectors[which].shape[0]
    argv = evaluate_argv(tmp_path, split_dir, vectors["users"], vectors["items"])
    target = tmp_path / f"{which}.npy"
    if array == "empty":
        np.save(target, np.zeros((0, 16)))
    elif array == "no columns":
        np.save(target, np.zeros((rows, 0)))
    elif array == "claims 2^40 rows":
        target.write_bytes(npy_claiming((2**40, 16), b"\0" * 64))
    elif array == "truncated":
        target.write_bytes(npy_claiming((rows, 16), b"\0" * 64))
    else:
        bad = vectors[which].copy()
        bad[3, 1] = np.nan
        np.save(target, bad)
    expect_one_line_error(capsys, argv, fragment)
    assert not (tmp_path / "m.json").exists()


def small_cache(folder, query=None, ids=None, scores=None, k: int = 3, dim: int = 4):
    """A complete 6-row cache over 5 items, written by the cache's own writer."""
    from distill.cache import complete_cache, shard_name, write_shard
    staging = folder.parent / f"{folder.name}.staging"
    staging.mkdir()
    n = 6
    write_shard(staging / shard_name(0), {
        "user": np.arange(n), "position": np.zeros(n), "query": np.ones((n, dim)) if query is None else query,
        "topk_ids": np.ones((n, k)) if ids is None else ids,
        "topk_scores": np.ones((n, k)) if scores is None else scores}, {})
    complete_cache(staging, folder, 1, {"split_hash": "x", "k": k, "dim": dim, "n_items": 5},
                   np.ones((6, dim), np.float32))
    return folder


def with_nan(shape, row):
    x = np.ones(shape)
    x[row, 1] = np.nan
    return x


@pytest.mark.parametrize("tensors,fragment", [
    ({"query": with_nan((6, 4), 2)}, "tensor query row 2 holds NaN or inf"),
    ({"scores": with_nan((6, 3), 4)}, "tensor topk_scores row 4 holds NaN or inf"),
    ({"ids": np.full((6, 3), 9)}, "tensor topk_ids holds 9..9, outside the items 0..5"),
], ids=["NaN query", "NaN score", "ids beyond the catalogue"])
def test_a_cache_holding_bad_numbers_is_refused_when_read_back(tmp_path, tensors, fragment):
    """Sealed when written, but by a teacher gone NaN: its sha256 matches, its numbers are unusable."""
    from distill.cache import TeacherCache
    from distill.errors import CorruptError
    with pytest.raises(CorruptError, match=r"shard-0+\.safetensors: " + re.escape(fragment)):
        TeacherCache(small_cache(tmp_path / "cache", **tensors))


def test_a_cache_padded_where_fewer_than_k_items_were_left_is_read():
    """-1 ids with -inf scores are what the search writes when a user has seen nearly everything."""
    import tempfile
    from pathlib import Path

    from distill.cache import TeacherCache
    ids, scores = np.ones((6, 3)), np.ones((6, 3))
    ids[:, 2], scores[:, 2] = -1, -np.inf
    with tempfile.TemporaryDirectory() as tmp:
        assert len(TeacherCache(small_cache(Path(tmp) / "cache", ids=ids, scores=scores))) == 6


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: {k: v for k, v in m.items() if k != "k"}, "'k' is None, expected a count"),
    (lambda m: dict(m, dim="4"), "'dim' is '4', expected a count"),
    (lambda m: dict(m, shards=5), "'shards' is int, expected a list"),
    (lambda m: dict(m, shards=[{"file": "shard-0.safetensors"}]), "'shards[0]' is not a file entry"),
    (lambda m: dict(m, items=dict(m["items"], file="../../etc/passwd")), "'items' names '../../etc/passwd', not a file"),
], ids=["no k", "dim a string", "shards not a list", "a shard without sha256", "a path outside the cache"])
def test_a_resealed_cache_manifest_is_checked_before_it_is_read(tmp_path, edit, fragment):
    """The manifest matches its own sha256 (resealed by hand): its keys are still checked, never a KeyError."""
    import json

    from distill.artifacts import json_digest
    from distill.cache import TeacherCache
    from distill.errors import CorruptError
    folder = small_cache(tmp_path / "cache")
    manifest = {k: v for k, v in json.loads((folder / "manifest.json").read_text()).items() if k != "manifest_sha256"}
    manifest = edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(dict(manifest, manifest_sha256=json_digest(manifest))))
    with pytest.raises(CorruptError, match=re.escape(fragment)):
        TeacherCache(folder)


def item_table(**replaced) -> dict:
    return {"item_id": [f"i{i}" for i in range(25)], "title": [f"movie {i}" for i in range(25)], **replaced}


@pytest.mark.parametrize("columns,fragment", [
    (item_table(title=[[f"movie {i}"] for i in range(25)]), "(data.columns.title) holds list"),
    (item_table(item_id=[float(i) for i in range(25)]), "items.parquet: column `item_id` (data.columns.item) holds double"),
    (item_table(item_id=[None] + [f"i{i}" for i in range(1, 25)]), "items.parquet: column `item_id` (data.columns.item) "
                                                                     "row 1: empty value"),
], ids=["list title", "float item ids", "null item id"])
def test_bad_item_file_column(tmp_path, capsys, columns, fragment):
    (tmp_path / "d.parquet").write_bytes(parquet(good_columns()))
    (tmp_path / "items.parquet").write_bytes(parquet(columns))
    expect_one_line_error(capsys, ["prepare", RECIPE, "--out", str(tmp_path / "run")] + sets([
        "data.format=parquet", f"data.path={tmp_path / 'd.parquet'}", f"data.items={tmp_path / 'items.parquet'}"]),
        fragment)


def test_jsonl_item_text_of_any_json_is_read(tmp_path):
    """Nested values in a text column are written as JSON, not refused, and never crash the reader."""
    import json
    (tmp_path / "d.jsonl").write_bytes(csv_text(good_jsonl()))
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"item_id": f"i{i}", "title": f"movie {i}",
                                                              "genres": [{"g": i}, 5, True] if i else "drama"}) + "\n"
                                                  for i in range(25)))
    from distill.config import DataConfig
    from distill.data import build_split
    s = build_split(DataConfig(format="jsonl", path=str(tmp_path / "d.jsonl"), items=str(tmp_path / "items.jsonl")))
    assert s.texts[s.items.index("i3")] == 'movie 3: {"g": "3"}, 5, true' and s.texts[s.items.index("i0")] == "movie 0: drama"


def reseal(folder, tensors: dict | None = None, **manifest_changes) -> None:
    """The split folder edited (split.safetensors replaced by `tensors`, manifest keys changed), then sealed again
    by hand (manifest.json's record over the files as they now are): only the content is wrong."""
    import json

    from safetensors.numpy import save_file

    from distill.artifacts import folder_files, write_record
    if tensors is not None:
        save_file(tensors, str(folder / "split.safetensors"))
    manifest = dict(json.loads((folder / "manifest.json").read_text()), **manifest_changes)
    write_record(folder / "manifest.json", manifest, files=folder_files(folder, "manifest.json"))


def drop(name):
    return lambda t: {k: v for k, v in t.items() if k != name}


@pytest.mark.parametrize("damage,fragment", [
    (drop("valid_negatives"), "split.safetensors: no tensor valid_negatives"),
    (lambda t: dict(t, sequence_items=t["sequence_items"] + 1000), "tensor sequence_items holds ids outside 1..60"),
    (lambda t: dict(t, sequence_offsets=t["sequence_offsets"][::-1].copy()), "sequence_offsets do not partition"),
    (lambda t: dict(t, test_negatives=t["test_negatives"][:3]),
     "tensor test_negatives is int64 (3, 19), expected integers of shape (40, 19)"),
    ("n_users", "manifest.json: n_users 'x' / n_items 60 are not counts"),
    ("escape", "users.tsv:4: unknown escape \\q"),
], ids=["a tensor missing", "ids beyond the catalogue", "offsets reversed", "negatives cut", "a count not a number",
        "an unknown escape"])
def test_a_resealed_or_edited_split_is_one_line(tmp_path, prepared, capsys, damage, fragment):
    """The split folder edited and resealed by hand: its seal matches, the loader still checks the content."""
    import shutil

    from safetensors.numpy import load_file
    split_dir, split = prepared
    folder = tmp_path / "split"
    shutil.copytree(split_dir, folder)
    if damage == "n_users":
        reseal(folder, n_users="x")
    elif damage == "escape":
        lines = (folder / "users.tsv").read_text().split("\n")
        (folder / "users.tsv").write_text("\n".join(lines[:3] + [lines[3] + "\\q"] + lines[4:]))
        reseal(folder)
    else:
        reseal(folder, damage(load_file(str(folder / "split.safetensors"))))
    rng = np.random.default_rng(0)
    argv = evaluate_argv(tmp_path, folder, rng.normal(size=(split.n_users, 8)), rng.normal(size=(split.n_items + 1, 8)))
    expect_one_line_error(capsys, argv, fragment)
