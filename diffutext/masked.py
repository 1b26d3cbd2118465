"""The masked (absorbing) process: the strongest non-autoregressive reference (`diffusion.process` mask).

Training (CMLM, Ghazvininejad et al. 2019; MDLM, Sahoo et al. 2024): at timestep t every written target token is
replaced by a learned mask vector with probability r = (t + 1)/T, and the classifier is trained with the
cross-entropy of its logits on the masked tokens alone. The network sees the revealed tokens' clean embeddings, so
it learns as a masked language model conditioned on the source.

Decoding (Mask-Predict): the timestep schedule of any sampler gives the masking ratio of each step. Every written
token starts masked; each step predicts the masked tokens, then masks again the ⌈n·(t_next + 1)/T⌉ least confident of
the n written tokens for the next visited t_next. A schedule that starts at T − 1 and visits N timesteps is
Mask-Predict with N iterations (`uniform`: its linear decay of the masked count).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .device import autocast


def mask_ratio(t: torch.Tensor, T: int) -> torch.Tensor:
    """r(t) = (t + 1)/T: the share of written tokens masked at timestep t (every one at T − 1)."""
    return (t.float() + 1) / T


def masked_input(x0: torch.Tensor, masked: torch.Tensor, mask_embedding: torch.Tensor) -> torch.Tensor:
    """The network's input: the mask vector at the masked positions (B, L), the clean embedding elsewhere."""
    return torch.where(masked.unsqueeze(-1), mask_embedding.to(x0.dtype).expand_as(x0), x0)


def corrupt(
    x0: torch.Tensor, written: torch.Tensor, t: torch.Tensor, T: int, uniform: torch.Tensor, mask_embedding: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, masked): each written position (B, L) masked where its uniform draw is below r(t) of its row."""
    masked = written & (uniform < mask_ratio(t, T)[:, None])
    return masked_input(x0, masked, mask_embedding), masked


@torch.inference_mode()
def mask_predict(
    model,
    timesteps: list[int],
    T: int,
    ids: torch.Tensor,
    target_mask: torch.Tensor,
    hold: torch.Tensor,
    banned: torch.Tensor | None = None,
    precision: str = "fp32",
    callback: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Mask-Predict over the visited `timesteps` (descending from T − 1): token ids (B, L), the written positions
    filled, the source and held positions as in `ids`."""
    from .model import Encoded, conditioning

    written = target_mask & ~hold
    rows = written.reshape(-1).nonzero().squeeze(1)
    n = written.sum(1)  # written tokens per row
    x_src = model.embed(ids).float()
    table = model.table().float()
    tokens = ids.clone()
    confidence = torch.zeros(ids.shape, device=ids.device)
    masked = written.clone()
    extra = conditioning(model, ids, target_mask, hold)
    with autocast(ids.device, precision):
        extra["memory"] = Encoded(model.encode(x_src, target_mask, ids))
    t_vec = torch.empty(ids.shape[0], dtype=torch.long, device=ids.device)
    idx = torch.arange(ids.shape[1], device=ids.device)
    for i, t in enumerate(timesteps):
        z = masked_input(torch.where(written.unsqueeze(-1), table[tokens], x_src), masked, model.mask_embedding.float())
        with autocast(ids.device, precision):
            _, logits = model(z, t_vec.fill_(t), with_head=True, **extra)
        if banned is not None:
            logits = logits.index_fill(-1, banned, float("-inf"))
        p, picked = torch.softmax(logits.float(), -1).max(-1)
        update = masked.reshape(-1).index_select(0, rows)  # only the masked tokens are predicted again
        flat_tokens, flat_conf = tokens.view(-1), confidence.view(-1)
        flat_tokens.index_copy_(0, rows, torch.where(update, picked, flat_tokens.index_select(0, rows)))
        flat_conf.index_copy_(0, rows, torch.where(update, p, flat_conf.index_select(0, rows)))
        if i + 1 < len(timesteps):  # mask again the least confident for the next step
            count = torch.ceil(n.float() * mask_ratio(torch.tensor(timesteps[i + 1]), T)).long()  # (B,)
            order = torch.where(written, confidence, math.inf).argsort(1)  # least confident first
            rank = torch.empty_like(order).scatter_(1, order, idx.expand_as(order))
            masked = written & (rank < count[:, None])
        if callback is not None:
            callback(i, t)
    return tokens
