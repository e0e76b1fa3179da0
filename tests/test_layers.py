"""The import layers (.importlinter) hold, and the contract catches an import that breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}
    return subprocess.run(LINT + ["--config", str(root / ".importlinter"), "--no-cache"], cwd=root, env=env,
                          capture_output=True, text=True)


def test_the_repository_keeps_its_layers():
    p = lint(ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "0 broken" in p.stdout


@pytest.mark.parametrize("module, line", [
    ("distill/data.py", "from distill import runs"),                       # a lower layer importing a higher one
    ("distill/stages/common.py", "from distill.stages import pipeline"),   # the pipeline imported by what it uses
    ("teacher/prompt.py", "import teacher.train"),                         # a part importing its driver
])
def test_an_upward_import_breaks_the_contract(tmp_path, module, line):
    for item in ("distill", "teacher", "student", ".importlinter"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copyfile
        copy(ROOT / item, tmp_path / item)
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}\n")
    p = lint(tmp_path)
    assert p.returncode == 1 and "BROKEN" in p.stdout, p.stdout + p.stderr


SERVE_WITHOUT = """
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"peft", "deepspeed", "transformers", "datasets", "gguf"}:
            raise ImportError(f"{name} is not installed (blocked by the test)")
sys.meta_path.insert(0, Refuse())
from distill.cli import main
code = main(sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"peft", "deepspeed", "transformers", "datasets"})
print("LOADED", loaded)
sys.exit(code)
"""


def test_recommend_from_an_export_needs_no_teacher_packages(tiny_run, tmp_path):
    """What `pip install anyo-distill[serve]` has is enough to answer from an export (the CI wheel check
    does the same with a real install)."""
    from distill.cli import main
    from distill.data import load_split
    run, _ = tiny_run
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    history = ",".join(load_split(run / "split").items[1:4])
    p = subprocess.run([sys.executable, "-c", SERVE_WITHOUT, "recommend", str(out), "--history", history, "--json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert '"items"' in p.stdout and "LOADED []" in p.stdout
