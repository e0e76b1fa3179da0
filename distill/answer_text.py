"""The server's answers as JSON text: `AnswerText` turns a Recommender's (B, k) ids and scores into
`{"items":[...]}` texts from per-item fragments made once (the server's /recommend answers, and the batch lane's
pieces: `distill.batch_lane`)."""

from __future__ import annotations

import json

import numpy as np


class AnswerText:
    """Answers as JSON text from per-item fragments (`{"item":ID,"title":T,"score":`): the bytes json.dumps
    gives for the item dicts, several times faster."""

    def __init__(self, head: list[str]):
        self.head = head

    @classmethod
    def of(cls, raw_ids: list[str], titles: list[str]) -> "AnswerText":
        return cls([f'{{"item":{json.dumps(r)},"title":{json.dumps(t)},"score":' for r, t in zip(raw_ids, titles)])

    def rows(self, ids: np.ndarray, scores: np.ndarray) -> list[str]:
        """`{"items":[...]}` for each row of the Recommender's (B, k) ids and scores (the id -1 tail dropped)."""
        head = self.head
        return ['{"items":[' + ",".join([head[i] + repr(s) + "}" for i, s in zip(row_ids, row_scores) if i > 0])
                + "]}" for row_ids, row_scores in zip(ids.tolist(), scores.tolist())]

    def piece(self, ids: np.ndarray, scores: np.ndarray) -> bytes:
        """The rows' texts, each after a comma: a batch answer's piece as it is sent, with no copy to add its
        separator (the first piece's leading comma is cut)."""
        return "".join(["," + row for row in self.rows(ids, scores)]).encode()
