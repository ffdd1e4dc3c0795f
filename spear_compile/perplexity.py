"""Perplexity on a text file: the whole file tokenized as one stream without special tokens,
non-overlapping windows of ``seq_len + 1`` tokens with stride ``seq_len``."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checks import read_text
from .errors import SpearError


def tokenize_file(tokenizer, path: Union[str, Path]) -> torch.Tensor:
    text = read_text(path, "data file")
    # verbose=False: the whole file is one stream cut into windows later, so the tokenizer's
    # "longer than the model's maximum sequence length" warning does not apply
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt", verbose=False)["input_ids"][0]
    return ids


def windows(ids: torch.Tensor, seq_len: int, max_windows: Optional[int] = None, source: str = "text") -> torch.Tensor:
    """``[num_windows, seq_len + 1]`` non-overlapping windows with stride ``seq_len``."""
    if seq_len < 1:
        raise SpearError(f"seq_len must be >= 1, got {seq_len}")
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise SpearError(f"{source}: {ids.numel()} tokens is shorter than one window of {seq_len + 1} tokens")
    if max_windows is not None:
        n = min(n, max_windows)
    idx = torch.arange(n).unsqueeze(1) * seq_len + torch.arange(seq_len + 1).unsqueeze(0)
    return ids[idx]


@torch.no_grad()
def forward_windows(model: nn.Module, wins: torch.Tensor, hooks=(), batch_size: int = 8) -> None:
    """Run ``model`` over token windows ``[W, T]`` in batches (for its hooks' sake), then remove
    the hook handles ``hooks``, also when the forward fails."""
    device = next(model.parameters()).device
    try:
        for i in range(0, wins.shape[0], batch_size):
            model(wins[i:i + batch_size].to(device))
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def perplexity(model: nn.Module, wins: torch.Tensor, batch_size: int = 8, progress: bool = True,
               desc: str = "ppl") -> float:
    """Token-weighted perplexity of ``model`` over windows ``[W, seq_len + 1]``."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, wins.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        batch = wins[i:i + batch_size].to(device)
        logits = model(batch[:, :-1]).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
