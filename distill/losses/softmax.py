"""Next-item softmax loss (the own loss of student and teacher).

full:     L = -log softmax(h E^T / tau)[y]            over all N items (padding excluded)
sampled:  L = -log [ e^{s_y} / (e^{s_y} + sum_{j in S, j != y} e^{s_j - log q_j}) ]
          with s = h.E / tau, S = sampled (+ in-batch) negatives, q_j the sampling
          probability (the logQ correction; constant and omitted for uniform sampling).
A negative equal to the row's target (a false negative) is masked out, and so is every item of
`exclude` ((N+1,) bool; the distilled student's items never seen in training, distill.cold_negatives).
When the number of negatives reaches N, S is every item and the loss is the full softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.errors import ConfigError


class NegativeSampler:
    """Draws shared negatives per batch: uniform over 1..N, or proportional to popularity."""

    def __init__(self, n_items: int, num: int, popularity: torch.Tensor | None = None):
        if num < 1:  # no negatives: the loss would be -log(1) = 0 and nothing would train
            raise ConfigError(f"num_negatives: the sampled softmax needs at least 1 negative, got {num}")
        self.n_items, self.num = n_items, num
        self.probs = None
        if popularity is not None:
            p = popularity.double().clone()
            p[0] = 0
            if p.sum() == 0:  # no counts: uniform
                p[1:] = 1
            self.probs = p / p.sum()

    @property
    def exhaustive(self) -> bool:
        return self.num >= self.n_items

    def sample(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(M,) item ids and their log-probabilities (None for uniform sampling)."""
        if self.exhaustive:
            return torch.arange(1, self.n_items + 1), None
        if self.probs is None:
            return torch.randint(1, self.n_items + 1, (self.num,), generator=generator), None
        ids = torch.multinomial(self.probs, self.num, replacement=True, generator=generator)
        return ids, self.probs[ids].log().float()


class SoftmaxLoss(nn.Module):
    def __init__(self, temperature: float = 1.0, sampler: NegativeSampler | None = None, in_batch: bool = False,
                 exclude: torch.Tensor | None = None):
        super().__init__()
        if not (math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"temperature: must be a finite number > 0, got {temperature}")
        self.temperature, self.sampler, self.in_batch = temperature, sampler, in_batch
        self.exclude = exclude                                           # (N+1,) bool, never a target

    def forward(self, inputs) -> torch.Tensor:
        h, y, table = inputs.hidden, inputs.targets, inputs.item_table
        if self.sampler is None:
            logits = h @ table.T / self.temperature                  # (P, N+1)
            logits[:, 0] = float("-inf")
            if self.exclude is not None:
                logits = logits.masked_fill(self.exclude.to(h.device)[None, :], float("-inf"))
            return F.cross_entropy(logits, y)
        neg, log_q = self.sampler.sample()
        neg = neg.to(h.device)
        if self.in_batch and not self.sampler.exhaustive:
            neg = torch.cat([neg, y])
            if log_q is not None:
                log_q = torch.cat([log_q.to(h.device), self.sampler.probs[y.cpu()].log().float().to(h.device)])
        pos = (h * table[y]).sum(-1, keepdim=True) / self.temperature   # (P, 1)
        neg_logits = h @ table[neg].T / self.temperature                # (P, M)
        if log_q is not None:
            neg_logits = neg_logits - log_q.to(h.device)
        neg_logits = neg_logits.masked_fill(neg[None, :] == y[:, None], float("-inf"))
        if self.exclude is not None:
            neg_logits = neg_logits.masked_fill(self.exclude.to(h.device)[neg][None, :], float("-inf"))
        logits = torch.cat([pos, neg_logits], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(y))
