"""Exact, deterministic order statistics on integer keys.

An activation becomes an *ordered key*: an integer whose order is the order of the values
(the IEEE bits with the magnitude of negative numbers flipped), of the value as float16 (`bits=16`,
exact for float16 stores) or float32 (`bits=32`). A key and a token index then pack into one int64,
`key * 2^32 + index'`, unique per token, so `torch.topk` over those integers is a full sort's
order with ties broken by token index, and merging two running selections is again a top-k of
their union: batch after batch, or shard after shard, the result is that of one sort.

    desc = desc_keys(value_keys(x, 32), token_index)       # larger value first, then lower index
    best = torch.topk(torch.cat([best, desc]), k, dim=0).values
"""

from __future__ import annotations

import torch

from universal_neurons.errors import InputError

__all__ = ["EMPTY_DESC", "EMPTY_ASC", "MAX_TOKENS", "DIGIT", "value_keys", "key_values", "desc_keys", "asc_keys",
           "split_desc", "split_asc", "digits", "top_merge", "check_tokens"]

EMPTY_DESC = torch.iinfo(torch.int64).min  # a slot of a descending selection that holds no token yet
EMPTY_ASC = torch.iinfo(torch.int64).max  # the same for an ascending selection
MAX_TOKENS = 2**32 - 1  # token indices must fit the low 32 bits of a packed key
DIGIT = 16  # bits per histogram digit: 65,536 bins
_LOW = 2**32


def value_keys(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Ordered integer keys of activations.

    Args:
        x: float activations, any shape; -0.0 counts as 0.0; NaN is refused.
        bits: 16 (the value as float16: exact for values read from a float16 store) or 32.

    Returns:
        int64 keys of `x`'s shape in `[-2^(bits-1), 2^(bits-1))`, ordered as the values.
    """
    if bool(torch.isnan(x).any()):
        raise InputError("the activations hold NaN; a NaN has no place in an order (cache the store again)")
    x = x + 0.0  # -0.0 -> +0.0: equal values get equal keys
    if bits == 16:
        b = x.to(torch.float16).view(torch.int16).to(torch.int32)
        return (b ^ ((b >> 15) & 0x7FFF)).to(torch.int64)
    b = x.to(torch.float32).view(torch.int32).to(torch.int64)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def key_values(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 values of ordered keys (the inverse of `value_keys`)."""
    if bits == 16:
        b = keys.to(torch.int32)
        b = b ^ ((b >> 15) & 0x7FFF)
        return b.to(torch.int16).view(torch.float16).to(torch.float32)
    b = keys.to(torch.int64)
    b = b ^ ((b >> 31) & 0x7FFFFFFF)
    return b.to(torch.int32).view(torch.float32)


def desc_keys(vkeys: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Packed keys whose descending order is (value descending, token index ascending).

    Args:
        vkeys: `[token, neuron]` ordered value keys.
        token_index: `[token]` global token indices, < 2^32 - 1.
    """
    return vkeys * _LOW + (MAX_TOKENS - token_index.to(torch.int64)).unsqueeze(-1)


def asc_keys(vkeys: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """Packed keys whose ascending order is (value ascending, token index ascending)."""
    return vkeys * _LOW + token_index.to(torch.int64).unsqueeze(-1)


def split_desc(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(value keys, token indices)` of `desc_keys`; empty slots give index -1."""
    vk = torch.div(packed, _LOW, rounding_mode="floor")
    idx = MAX_TOKENS - (packed - vk * _LOW)
    return vk, torch.where(packed == EMPTY_DESC, torch.full_like(idx, -1), idx)


def split_asc(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(value keys, token indices)` of `asc_keys`; empty slots give index -1."""
    vk = torch.div(packed, _LOW, rounding_mode="floor")
    idx = packed - vk * _LOW
    return vk, torch.where(packed == EMPTY_ASC, torch.full_like(idx, -1), idx)


def digits(vkeys: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The keys as unsigned numbers split in 16-bit digits: `(high, low)`, low None for 16-bit keys."""
    u = vkeys + 2 ** (bits - 1)
    if bits == 16:
        return u, None
    return u >> DIGIT, u & (2**DIGIT - 1)


def top_merge(held: torch.Tensor, new: torch.Tensor, k: int, *, largest: bool = True) -> torch.Tensor:
    """The `k` largest (or smallest) packed keys of `held` and `new` along dim 0, sorted.

    Exact and deterministic, since packed keys are unique per token; `held` has k rows
    (empty slots hold `EMPTY_DESC` / `EMPTY_ASC`). Works on any trailing shape.
    """
    if new.shape[0] == 0:
        return held
    return torch.topk(torch.cat([held, new]), k, dim=0, largest=largest, sorted=True).values


def check_tokens(n_tokens: int) -> None:
    """Refuse token counts whose indices do not fit a packed key."""
    if n_tokens >= MAX_TOKENS:
        raise InputError(f"{n_tokens} tokens: top-k keys pack token indices in 32 bits (< {MAX_TOKENS}); "
                         "explain a smaller token set, or shards of it")
