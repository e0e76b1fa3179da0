"""A public synthetic data set where item text decides the next item, with its Bayes-optimal hit rates.

    python benchmarks/text_decides.py --out benchmarks/data/textdecides   # the recipes' data (seed 0)
    python benchmarks/text_decides.py --out /tmp/big --users 100000 --franchises 60000

The catalogue is `--franchises` franchises, each of 2 to `--max-sequels` + 1 items in order ("Vorlan Drift",
"Vorlan Drift 2", "Vorlan Drift 3"), and `--standalone` single items. The item file gives each item a
title, a release year (a franchise's items in increasing years) and a genre (one per franchise), so the
text says which item follows which; the interactions show each transition only as often as users happen
to watch that franchise.

Each user watches 3 + Poisson(--mean-length - 3) distinct items. The first is a fresh pick; after an item
with an unwatched successor (the next item of its franchise) the next is

    the successor                                      with probability --follow
    otherwise, with probability --noise, any unwatched item, uniformly (an out-of-order sequel included)
    otherwise, a fresh pick: an unwatched entry item (a franchise's first item or a standalone one)
    drawn by Zipf(--zipf) popularity

and after any other item the same without the successor. So for every position the generator knows the
exact distribution of the next item, P(j | history), and the Bayes-optimal ranking (the one a model that
knows every franchise's order from the text and the popularity would give) has

    HR@K = E[ sum of the K largest P(j | history) ]      over the users' test (last) position,

written with the validation (second last) rate to NAME.bayes.json (history-masked ranking, as anyo's
harness scores: the generator never repeats an item). Cold items are the protocol's: a recipe sets
`data.cold_items` (recipes/textdecides.yaml makes 20% of the items cold), which removes their training
interactions without changing any target, so the Bayes rates stay those of the file.

Output: NAME.inter (user_id, item_id, timestamp) and NAME.item (item_id, movie_title, release_year, class),
RecBole atomic files the default data loader reads (`data.path: FOLDER`, `data.name: NAME`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

GENRES = ("Drama", "Comedy", "Action", "Thriller", "Romance", "Horror", "Sci-Fi", "Animation", "Documentary",
          "Western", "Musical", "Mystery", "Fantasy", "Crime", "War", "Adventure")
ONSETS = ("b", "br", "c", "cr", "d", "dr", "f", "g", "gl", "h", "k", "l", "m", "n", "p", "pr", "r", "s", "st",
          "t", "tr", "v", "z", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
CODAS = ("", "n", "r", "l", "s", "th", "x", "m", "nd", "rk")


def invented_names(n: int, rng: np.random.Generator, words: list[str] | None = None) -> list[str]:
    """`n` distinct names: two invented words ("Vorlan Drift"), or two of `words` ("dark king")."""
    names: set[str] = set()
    out = []
    while len(out) < n:
        if words:
            name = " ".join(rng.choice(words, size=2, replace=False))
        else:
            name = " ".join("".join(rng.choice(parts) for parts in (ONSETS, VOWELS, ONSETS, VOWELS, CODAS)).title()
                            for _ in range(2))
        if name not in names:
            names.add(name)
            out.append(name)
    return out


def catalogue(rng, franchises: int, max_sequels: int, standalone: int, words):
    """(titles, years, genres, successor (-1 = none), entry mask) of every item, in a shuffled order."""
    lengths = rng.integers(2, max_sequels + 2, size=franchises)
    names = invented_names(franchises + standalone, rng, words)
    titles, years, genres, succ, entry = [], [], [], [], []
    for f, n in enumerate(lengths):
        start, genre = int(rng.integers(1970, 2015)), GENRES[int(rng.integers(len(GENRES)))]
        base = len(titles)
        for k in range(n):
            titles.append(names[f] if k == 0 else f"{names[f]} {k + 1}")
            years.append(start + 3 * k)
            genres.append(genre)
            succ.append(base + k + 1 if k + 1 < n else -1)
            entry.append(k == 0)
    for s in range(standalone):
        titles.append(names[franchises + s])
        years.append(int(rng.integers(1970, 2020)))
        genres.append(GENRES[int(rng.integers(len(GENRES)))])
        succ.append(-1)
        entry.append(True)
    # shuffle the ids so that nothing but the text tells an item's franchise and order
    perm = rng.permutation(len(titles))                 # new id of old item i = inv[i]
    inv = np.empty_like(perm)
    inv[perm] = np.arange(len(perm))
    succ = np.asarray(succ)
    succ_new = np.where(succ[perm] >= 0, inv[np.maximum(succ[perm], 0)], -1)
    return ([titles[i] for i in perm], [years[i] for i in perm], [genres[i] for i in perm], succ_new,
            np.asarray(entry)[perm])


def next_distribution(seen: np.ndarray, last: int, succ: np.ndarray, pop: np.ndarray, follow: float,
                      noise: float) -> np.ndarray:
    """(N,) P(next = j | history): the generative process, seen items excluded."""
    unseen = ~seen
    uniform = unseen / max(unseen.sum(), 1)
    fresh = pop * unseen
    fresh = fresh / fresh.sum() if fresh.sum() > 0 else uniform
    p = noise * uniform + (1 - noise) * fresh
    s = succ[last] if last >= 0 else -1
    if s >= 0 and unseen[s]:
        p = (1 - follow) * p
        p[s] += follow
    return p


def generate(users: int = 1000, franchises: int = 1200, max_sequels: int = 3, standalone: int = 600,
             mean_length: float = 8.0, follow: float = 0.85, noise: float = 0.05, zipf: float = 1.0, seed: int = 0,
             words: list[str] | None = None):
    """(sequences: list of item-id lists, titles, years, genres, bayes: {stage: {HR@1, HR@10}})."""
    rng = np.random.default_rng(seed)
    titles, years, genres, succ, entry = catalogue(rng, franchises, max_sequels, standalone, words)
    n = len(titles)
    rank = np.empty(n)
    rank[rng.permutation(np.flatnonzero(entry))] = np.arange(1, entry.sum() + 1)
    pop = np.where(entry, np.where(entry, rank, 1.0) ** -zipf, 0.0)              # (N,) Zipf over entry items
    sequences, bayes = [], {"valid": {"HR@1": [], "HR@10": []}, "test": {"HR@1": [], "HR@10": []}}
    for _ in range(users):
        length = min(3 + int(rng.poisson(max(mean_length - 3, 0))), n)
        seen, last, seq = np.zeros(n, bool), -1, []
        for t in range(length):
            p = next_distribution(seen, last, succ, pop, follow, noise)
            stage = {length - 1: "test", length - 2: "valid"}.get(t)
            if stage:
                top = np.sort(p)[::-1]
                bayes[stage]["HR@1"].append(top[0])
                bayes[stage]["HR@10"].append(top[:10].sum())
            last = int(rng.choice(n, p=p))
            seen[last] = True
            seq.append(last)
        sequences.append(seq)
    rates = {s: {k: float(np.mean(v)) for k, v in m.items()} for s, m in bayes.items()}
    return sequences, titles, years, genres, rates


def write(folder: Path, name: str, sequences, titles, years, genres, bayes: dict, options: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    inter = ["user_id:token\titem_id:token\ttimestamp:float"]
    for u, seq in enumerate(sequences):
        inter += [f"u{u}\ti{i}\t{1_000_000 + 100 * u + t}" for t, i in enumerate(seq)]
    (folder / f"{name}.inter").write_text("\n".join(inter) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"i{i}\t{t}\t{y}\t{g}" for i, (t, y, g) in enumerate(zip(titles, years, genres))]
    (folder / f"{name}.item").write_text("\n".join(items) + "\n")
    (folder / f"{name}.bayes.json").write_text(json.dumps({"bayes_optimal": bayes, "options": options,
                                                           "users": len(sequences), "items": len(titles),
                                                           "interactions": sum(map(len, sequences))},
                                                          indent=2) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for NAME.inter, NAME.item, NAME.bayes.json")
    p.add_argument("--name", default="textdecides")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--franchises", type=int, default=1200)
    p.add_argument("--max-sequels", type=int, default=3, help="a franchise has 2 to this + 1 items")
    p.add_argument("--standalone", type=int, default=600)
    p.add_argument("--mean-length", type=float, default=8.0)
    p.add_argument("--follow", type=float, default=0.85)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--zipf", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    options = {k: v for k, v in vars(a).items() if k not in ("out", "name")}
    seqs, titles, years, genres, bayes = generate(a.users, a.franchises, a.max_sequels, a.standalone, a.mean_length,
                                                  a.follow, a.noise, a.zipf, a.seed)
    write(Path(a.out), a.name, seqs, titles, years, genres, bayes, options)
    print(json.dumps({"bayes_optimal": bayes, "items": len(titles), "interactions": sum(map(len, seqs))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
