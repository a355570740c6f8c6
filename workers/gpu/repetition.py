"""Repetition control on a decode step's logits: pure tensor ops on the step's logits and each row's
own generated tokens, with no host sync, so they run inside the captured CUDA-graph step (and
unchanged on the CPU).

Both rules are transformers' own (`no_repeat_ngram_size`, `repetition_penalty`: the
NoRepeatNGram and RepetitionPenalty logits processors), applied to the tokens the row generated,
not to its prompt: a summary may quote its transcript; what it must not do is repeat itself.
Tests compare them with those processors given the generated tokens only.
"""

from __future__ import annotations

import torch


def ban_repeated_ngrams(logits: torch.Tensor, out: torch.Tensor, written: torch.Tensor, n: int) -> None:
    """No n-gram twice: where a row's last n-1 tokens already occurred followed by token t, t is
    banned (-inf), in place. logits: [B, V]; out: [B, W] each row's generated tokens, of which the
    first written[b] are real (the rest are stale and ignored); n >= 1."""
    rows, width = out.shape
    if width < n:
        return
    windows = out.unfold(1, n, 1)  # [B, S, n], S = W - n + 1: every n-gram of every row
    starts = torch.arange(width - n + 1, device=out.device)  # [S]
    hit = starts[None, :] <= (written - n)[:, None]  # [B, S] n-grams lying inside the written tokens
    if n > 1:
        at = (written - (n - 1))[:, None] + torch.arange(n - 1, device=out.device)  # [B, n-1]
        prefix = out.gather(1, at.clamp(min=0))  # [B, n-1] the row's last n-1 tokens
        hit &= (windows[:, :, : n - 1] == prefix[:, None, :]).all(dim=-1)
    # A scatter of -inf where an n-gram repeats and of 0 elsewhere: no data-dependent shapes.
    penalty = torch.zeros(hit.shape, dtype=logits.dtype, device=logits.device).masked_fill_(hit, float("-inf"))
    logits.scatter_add_(1, windows[:, :, n - 1], penalty)


def penalise_repeats(logits: torch.Tensor, out: torch.Tensor, written: torch.Tensor, penalty: float) -> None:
    """transformers' repetition penalty over each row's generated tokens, in place: the logit of a
    token the row already generated is divided by `penalty` if positive, multiplied if negative.
    logits: [B, V]; out: [B, W]; written: [B] (>= 1 for a real row)."""
    cols = torch.arange(out.shape[1], device=out.device)[None, :] < written[:, None]  # [B, W]
    # Unwritten columns point at the row's first token: penalised anyway, so writes agree.
    idx = torch.where(cols, out, out[:, :1])  # [B, W]
    score = logits.gather(1, idx)
    logits.scatter_(1, idx, torch.where(score < 0, score * penalty, score / penalty))
