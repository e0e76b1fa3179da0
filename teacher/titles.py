"""The generative baseline's titles: how an item is named in a prompt and found in an answer.

Each item's title (`item #ID` when it has none) is cut to `llara.max_title_tokens` tokens; a title that is then
shared by several items (MovieLens-100K has the same title for two item ids) gets ` (#ID)` appended to every
copy, so the title, and only that, identifies an item in the prompt and in the answer. Unique titles stay as
they are (no extra tokens). Titles are compared in the tokenizer's own normal form (decode(encode(text)), first
line, whitespace collapsed, lower case), so a tokenizer that does not round-trip text still matches.

Matching (LLaRA's rule, made precise): the first line of the decoded output is searched for every candidate
title (substring, case-insensitive), longest titles first; an occurrence lying inside an occurrence already
claimed by a longer title does not count (so `heat wave` names one title even when `heat` is also a candidate;
`heat wave and heat` names two). The output is valid when exactly one candidate is named, and correct when that
candidate is the target.
"""

from __future__ import annotations

from distill.errors import ConfigError


def normalise(text: str) -> str:
    """The form titles are compared in: first non-empty line, whitespace collapsed, lower case."""
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()).lower() if lines else ""


def match_candidates(text: str, titles: list[str]) -> list[int]:
    """Indices (into `titles`) of the candidates named in `text`; both already normalised.

    Longest titles claim their occurrences first; an occurrence inside a claimed span does not count.
    """
    claimed: list[tuple[int, int]] = []
    named = []
    for i in sorted(range(len(titles)), key=lambda j: (-len(titles[j]), j)):
        title, hit = titles[i], False
        if not title:
            continue
        start = text.find(title)
        while start >= 0:
            end = start + len(title)
            if not any(a <= start and end <= b for a, b in claimed):
                claimed.append((start, end))
                hit = True
            start = text.find(title, start + 1)
        if hit:
            named.append(i)
    return sorted(named)


def judge(text: str, titles: list[str], target: int) -> tuple[bool, bool, int]:
    """(valid, correct, named candidate or -1) for one normalised output against its candidates."""
    named = match_candidates(text, titles)
    valid = len(named) == 1
    return valid, valid and named[0] == target, named[0] if valid else -1


def unique_titles(tokenizer, titles: list[str], max_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Per item id (0 = padding): token ids of ` title` and its normalised text, unique over items 1..N."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]
    raw = [t.strip() or f"item #{i}" for i, t in enumerate(titles)]
    ids = [x[:max_tokens] for x in encode([" " + t for t in raw])]
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    norm = [normalise(t) for t in texts]
    seen: dict[str, list[int]] = {}
    for i in range(1, len(norm)):
        seen.setdefault(norm[i], []).append(i)
    dups = [i for group in seen.values() if len(group) > 1 for i in group]
    if dups:
        fixed = encode([f" {texts[i]} (#{i})" for i in dups])
        for i, x in zip(dups, fixed):
            ids[i] = x
            norm[i] = normalise(tokenizer.decode(x, skip_special_tokens=True))
    final: dict[str, int] = {}
    for i in range(1, len(norm)):
        if norm[i] in final:
            raise ConfigError(f"llara.max_title_tokens: items {final[norm[i]]} and {i} read the same after "
                              f"tokenizing ({norm[i]!r}); the tokenizer cannot tell their titles apart")
        final[norm[i]] = i
    ids[0], norm[0] = [], ""
    return ids, norm
