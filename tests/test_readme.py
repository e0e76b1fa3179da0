"""Every `anyo` command the README shows is one the CLI accepts: its words parse, and every option in its
[brackets] exists for that command (the commands themselves run in tests/ and `make demo`)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from distill.cli import build_parser

README = Path(__file__).parents[1] / "README.md"


def shown_commands() -> list[str]:
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README.read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.split(" #")[0].strip()
        for part in line.split("&&"):
            if part.strip().startswith("anyo "):
                commands.append(part.strip())
    return commands


def subparser(parser, words: list[str]):
    """The argparse parser of `anyo WORDS...` (e.g. `teacher infer`)."""
    for word in words:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs or word not in subs[0].choices:
            return parser
        parser = subs[0].choices[word]
    return parser


def test_the_readme_shows_the_commands():
    shown = shown_commands()
    assert len(shown) >= 15 and any(c.startswith("anyo run ml100k") for c in shown)


def test_every_command_in_the_readme_parses():
    parser = build_parser()
    for command in shown_commands():
        optional = re.findall(r"\[([^\]]*)\]", command)
        required = shlex.split(re.sub(r"\[[^\]]*\]", " ", command))[1:]
        required = [w.split("|")[0] for w in required]
        parser.parse_args(required)                      # SystemExit (a failed test) if the CLI refuses it
        own = subparser(parser, required)
        for group in optional:
            flag = group.split()[0]
            if flag.startswith("-"):
                assert flag in own._option_string_actions, f"{command}: {flag} is not an option"
