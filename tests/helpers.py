"""What the tests (and benchmarks/scale.py) share besides fixtures: a small synthetic data set with titles, a
tiny random Llama saved as a local HF folder, the tiny recipe's overrides, and a warm launcher of `anyo`
processes for the kill tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = "the a movie film star war love story night day city man woman king lost return dark light".split()


def write_dataset(folder: Path, n_users: int = 40, n_items: int = 60, seed: int = 0, name: str = "toy") -> Path:
    """A RecBole-style NAME.inter/NAME.item with sequential structure (item i tends to follow i-1)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(n_users):
        length = int(rng.integers(5, 16))
        start = int(rng.integers(1, n_items + 1))
        for t in range(length):
            item = (start + t + int(rng.integers(0, 2))) % n_items + 1
            lines.append(f"u{u}\ti{item}\t{int(rng.integers(1, 6))}\t{1000 + 10 * t + u}")
    (folder / f"{name}.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token"]
    for i in range(1, n_items + 1):
        title = " ".join(rng.choice(WORDS, size=2))
        items.append(f"i{i}\t{title}\t{1990 + i % 20}")
    (folder / f"{name}.item").write_text("\n".join(items) + "\n")
    return folder


def write_tiny_llama(folder: Path, causal: bool = False) -> Path:
    """A 2-layer random Llama (headless, or with its head tied as SmolLM2's when `causal`) and a
    word-level tokenizer with an EOS, saved like any HF model folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = WORDS + ("A user watched these movies in order : The next movie they will watch is Choose the next movie "
                      "they will watch from candidates Answer item # (# ( )").split() + [str(i) for i in range(200)]
    tok.train_from_iterator([" ".join(corpus)],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(fast) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
                      tie_word_embeddings=True)
    (LlamaForCausalLM if causal else LlamaModel)(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def tiny_recipe_overrides(data: Path, model: Path) -> list[str]:
    """`--set` overrides that make the default recipe run in seconds on the toy data."""
    return [f"data.path={data}", "data.name=toy", "data.max_len=10",
            "student.hidden_size=16", "student.num_heads=2", "student.epochs=3", "student.patience=3",
            "student.batch_size=16",
            f"teacher.model={model}", "teacher.num_layers=null", "teacher.lora_r=4", "teacher.num_experts=2",
            "teacher.examples_per_epoch=32", "teacher.epochs=2", "teacher.batch_size=8", "teacher.max_history=5",
            "teacher.eval_batch_size=16",
            "distill.epochs=3", "distill.positions=2", "distill.k=5", "distill.backend=hf",
            "distill.shard_users=16",
            "bench.teacher_backends=[hf]", "bench.batch_sizes=[1, 32]", "bench.latency_users=20", "bench.passes=1"]


RECIPE = str(Path(__file__).parents[1] / "recipes" / "ml100k.yaml")


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


class Launcher:
    """Starts `anyo` commands as children of one warm process (tests/launcher.py)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("launcher.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("tests/launcher.py failed to start")

    def start(self, argv: list[str], log: Path, env: dict | None = None, kill_after: str | None = None,
              read_only: Path | None = None) -> int:
        """Launch `anyo ARGV` with output in `log`; returns its pid, also its process group.
        kill_after="module.name:N": the command kills itself when that function returns for the N-th time.
        read_only=PATH: the command fails if it writes anything under PATH."""
        job = {"argv": argv, "log": str(log), "env": env or {}, "kill_after": kill_after,
               "read_only": str(read_only) if read_only else None}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    @staticmethod
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    def wait(self, pid: int, log: Path, timeout: float = 900) -> int:
        """Block until the command ends; its exit status (-9 if it was killed)."""
        deadline = time.monotonic() + timeout
        while self.alive(pid):
            assert time.monotonic() < deadline, f"anyo {pid} still running after {timeout}s"
            time.sleep(0.05)
        rc = Path(f"{log}.rc")
        return int(rc.read_text()) if rc.is_file() else -9

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
