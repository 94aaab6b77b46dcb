"""Building token sets: a text source tokenised once, joined with EOS, cut into rows with BOS
first, rows sampled with a recorded seed, and masked (docs/method.md §2); a held-out set of
disjoint rows of the same text for the ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError, UniversalNeuronsError
from universal_neurons.runtime import progress

from .text import read_documents
from .tokens import TokenSet, TokenSetConfig, newline_ids, tokenizer_info

__all__ = ["build_token_set", "build_study_and_held_out"]


@dataclass
class _Stream:
    """A text source tokenised and joined: what every token set of that text is cut from."""

    ids: np.ndarray  # [token] int32, documents joined with EOS
    doc: np.ndarray  # [token] int32, the source document of each token
    source: dict[str, Any]
    info: dict[str, Any]
    bos: int
    eos: int
    n_documents: int

    def n_rows(self, ctx_len: int) -> int:
        """Whole rows of `ctx_len - 1` stream tokens (BOS is prepended to each)."""
        return len(self.ids) // (ctx_len - 1)

    def grid(self, ctx_len: int) -> tuple[np.ndarray, np.ndarray]:
        """`(ids, doc)`, each `[row, ctx_len - 1]`: the stream cut into every whole row."""
        body = ctx_len - 1
        n = self.n_rows(ctx_len)
        return self.ids[: n * body].reshape(n, body), self.doc[: n * body].reshape(n, body)


def _tokenise(source, tokenizer, config: TokenSetConfig) -> _Stream:
    docs, src = read_documents(source, config)
    info = tokenizer_info(tokenizer)
    eos = info["eos_token_id"]
    bos = info["bos_token_id"] if info["bos_token_id"] is not None else eos
    if eos is None:
        raise UniversalNeuronsError(f"tokenizer {info['name_or_path']!r} has no EOS token to separate documents; "
                                    "set tokenizer.eos_token")
    kept = [(i, d) for i, d in enumerate(docs) if d]
    if not kept:
        raise UniversalNeuronsError(f"the text source ({src.get('path') or src['kind']}) holds no text; "
                                    "pass files or strings with content")
    ids_parts: list[np.ndarray] = []
    doc_parts: list[np.ndarray] = []
    step, prev = 1000, None
    for k in progress(range(0, len(kept), step), desc="tokenise", unit="kdoc"):
        chunk = kept[k:k + step]
        enc = tokenizer([d for _, d in chunk], add_special_tokens=False, verbose=False)["input_ids"]
        for (doc_i, _), toks in zip(chunk, enc):
            if prev is not None:  # the separator belongs to the document it ends
                ids_parts.append(np.array([eos], dtype=np.int32))
                doc_parts.append(np.array([prev], dtype=np.int32))
            prev = doc_i
            ids_parts.append(np.asarray(toks, dtype=np.int32))
            doc_parts.append(np.full(len(toks), doc_i, dtype=np.int32))
    stream = _Stream(np.concatenate(ids_parts), np.concatenate(doc_parts), src, info, int(bos), int(eos), len(docs))
    if stream.n_rows(config.ctx_len) == 0:
        raise UniversalNeuronsError(f"the text source gives {len(stream.ids)} tokens, fewer than one row of "
                                    f"ctx_len-1={config.ctx_len - 1}; pass more text or a smaller ctx_len")
    return stream


def _sample(candidates: np.ndarray, n_rows: int, seed: int, shuffle: bool) -> np.ndarray:
    """`n_rows` of the stream rows `candidates` (`[row]`, ascending), drawn with `seed`; in stream
    order unless `shuffle`. With every row a candidate this is the draw token sets always made."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(candidates), size=n_rows, replace=False) if n_rows < len(candidates) \
        else np.arange(len(candidates))
    rows = candidates[pick]
    return rng.permutation(rows) if shuffle else np.sort(rows)


def _cut(stream: _Stream, config: TokenSetConfig, rows: np.ndarray, tokenizer) -> TokenSet:
    """The token set of stream rows `rows`: BOS prepended, masked as `config` says."""
    grid, dgrid = stream.grid(config.ctx_len)
    n_rows = len(rows)
    ids = np.concatenate([np.full((n_rows, 1), stream.bos, np.int32), grid[rows]], axis=1)
    doc_index = np.concatenate([np.full((n_rows, 1), -1, np.int32), dgrid[rows]], axis=1)
    excluded = set(config.extra_exclude_ids)
    if config.exclude_special:
        excluded |= {i for i in (stream.bos, stream.eos, stream.info["pad_token_id"]) if i is not None}
    nl = config.newline_ids if config.newline_ids is not None else newline_ids(tokenizer, config.newline_mask)
    if config.exclude_newlines:
        excluded |= set(nl)
    mask = ~np.isin(ids, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    if config.exclude_bos:
        mask[:, 0] = False
    src = {**stream.source, "n_documents": stream.n_documents, "n_stream_tokens": int(len(stream.ids)),
           "n_rows_available": int(stream.n_rows(config.ctx_len)),
           "row_order": "shuffled" if config.shuffle else "stream", "bos_token_id": stream.bos,
           "eos_token_id": stream.eos, "excluded_ids": sorted(int(i) for i in excluded),
           "newline_ids": [int(i) for i in nl],
           "newline_rule": "explicit ids" if config.newline_ids is not None else config.newline_mask}
    return TokenSet(ids=ids, mask=mask, doc_index=doc_index, source_rows=rows, config=config,
                    tokenizer_info=stream.info, source=src)


def _check_same_stream(stream: _Stream, other: TokenSet, config: TokenSetConfig) -> None:
    """Refuse a token set that was not cut from this text with this tokenizer and row length."""
    if other.ctx_len != config.ctx_len:
        raise IncompatibleInputsError(f"the token set to hold out from has rows of ctx_len={other.ctx_len}, this one "
                                      f"is cut with ctx_len={config.ctx_len}; use the same ctx_len for both")
    if other.tokenizer_info.get("fingerprint") != stream.info["fingerprint"]:
        raise IncompatibleInputsError("the token set to hold out from was built with another tokenizer; build the "
                                      "held-out set with the same model family's tokenizer")
    grid, _ = stream.grid(config.ctx_len)
    rows = other.source_rows
    if len(rows) and (rows.max() >= len(grid) or not np.array_equal(grid[rows], other.ids[:, 1:])):
        raise IncompatibleInputsError("the token set to hold out from was not cut from this text (its rows differ "
                                      "from the text's rows at the same places); pass the text it was built from")


def build_token_set(source, tokenizer, config: TokenSetConfig = TokenSetConfig(), *,
                    held_out_from: TokenSet | None = None) -> TokenSet:
    """Tokenise `source`, join documents with EOS, cut rows with BOS first, sample and mask.

    Args:
        source: a `.txt` file (one document), a `.jsonl` file (one document per line, field
            `config.text_field`), a folder of those (recursively, sorted), a list of strings (one
            document each), or `'hf:<dataset>[:<config>]'` (needs the hub and `datasets`).
        tokenizer: the model family's Hugging Face tokenizer.
        config: a `TokenSetConfig`.
        held_out_from: a token set cut from the same text (same tokenizer and `ctx_len`;
            checked): only rows it does not hold are drawn, so the result is disjoint from it
            (held-out tokens). `config.n_tokens=None` then takes every remaining row; the draw
            uses `config.seed`. Recorded in `source['held_out_from']`.

    Returns:
        a `TokenSet` with `config.n_tokens // ctx_len` rows (all rows when None).

    Raises:
        InputError: more rows asked for than the text (outside `held_out_from`) gives.
        IncompatibleInputsError: `held_out_from` was not cut from this text.
    """
    stream = _tokenise(source, tokenizer, config)
    candidates = np.arange(stream.n_rows(config.ctx_len))
    if held_out_from is not None:
        _check_same_stream(stream, held_out_from, config)
        candidates = np.setdiff1d(candidates, held_out_from.source_rows)
    outside = f" outside the {held_out_from.n_rows} rows held out from" if held_out_from is not None else ""
    ts = _cut(stream, config, _study_rows(config, candidates, outside), tokenizer)
    if held_out_from is not None:
        ts.source["held_out_from"] = {"hash": held_out_from.hash, "n_rows": held_out_from.n_rows,
                                      "disjoint_rows": True}
    return ts


def _study_rows(config: TokenSetConfig, candidates: np.ndarray, outside: str = "") -> np.ndarray:
    """The rows `config` draws from `candidates`: `n_tokens // ctx_len` of them, or all when None."""
    n_rows = len(candidates) if config.n_tokens is None else config.n_tokens // config.ctx_len
    if n_rows > len(candidates) or n_rows == 0:
        have = len(candidates)
        raise InputError(f"n_tokens={config.n_tokens} needs {n_rows} rows of {config.ctx_len} but the text source "
                         f"gives only {have}{outside} ({have * config.ctx_len} tokens); pass more text or n_tokens <= "
                         f"{have * config.ctx_len}")
    return _sample(candidates, n_rows, config.seed, config.shuffle)


def build_study_and_held_out(source, tokenizer, config: TokenSetConfig = TokenSetConfig(), *, share: float,
                             max_tokens: int | None = None) -> tuple[TokenSet, TokenSet]:
    """The token set to study and a held-out one, disjoint rows of the same text, tokenised once.

    Held-out tokens are what an ablation is measured on: rows that did not choose the neurons.
    The held-out set has `ceil(share * rows of the text)` rows, at most `max_tokens // ctx_len`,
    drawn with seed `config.seed + 1`, in stream order. With `config.n_tokens=None` they are
    drawn first and the studied set is every other row; with `n_tokens`, the studied rows are
    drawn first (exactly the rows `build_token_set` draws) and the held-out rows from the rest.
    Each set records the other in its `source` (`held_out` / `held_out_from`: hash, rows).

    Args:
        source: what `build_token_set` reads.
        tokenizer: the model family's tokenizer.
        config: the studied set's settings; the held-out set has the same ctx_len and mask.
        share: in (0, 1), the share of the text's rows held out.
        max_tokens: at most this many held-out tokens (whole rows); None = the whole share.

    Returns:
        `(study, held_out)`.

    Raises:
        ConfigError: `share` outside (0, 1) or `max_tokens` below one row.
        InputError: no row would be left to study, or none to hold out (before any work).
    """
    if not 0.0 < float(share) < 1.0:
        raise ConfigError(f"the held-out share must be in (0, 1), e.g. 0.1, got {share!r}")
    if max_tokens is not None and max_tokens < config.ctx_len:
        raise ConfigError(f"max_tokens={max_tokens} is less than one row of ctx_len={config.ctx_len}; raise it or "
                          "pass None")
    stream = _tokenise(source, tokenizer, config)
    ctx, n_avail = config.ctx_len, stream.n_rows(config.ctx_len)
    n_held = int(np.ceil(share * n_avail))
    if max_tokens is not None:
        n_held = min(n_held, max_tokens // ctx)
    all_rows = np.arange(n_avail)
    held_seed = config.seed + 1
    fix = ("pass more text, or set the held-out share to 0 (held_out_share=0, --held-out-share 0) and give held-out "
           "tokens another way (--ablation-tokens FILE)")
    if config.n_tokens is None:
        if n_avail - n_held < 1:
            raise InputError(f"the text gives {n_avail} row(s) of ctx_len={ctx}; holding out {n_held} "
                             f"(share {share}) leaves none to study: {fix}")
        held_rows = _sample(all_rows, n_held, held_seed, False)
        study_rows = _study_rows(config, np.setdiff1d(all_rows, held_rows))
    else:
        study_rows = _study_rows(config, all_rows)
        rest = np.setdiff1d(all_rows, study_rows)
        if not len(rest):
            raise InputError(f"n_tokens={config.n_tokens} takes all {n_avail} rows the text gives; none is left for "
                             f"held-out tokens: lower n_tokens, or {fix}")
        held_rows = _sample(rest, min(n_held, len(rest)), held_seed, False)
    study = _cut(stream, config, study_rows, tokenizer)
    held_cfg = config.replace(n_tokens=len(held_rows) * ctx, seed=held_seed, shuffle=False)
    held = _cut(stream, held_cfg, held_rows, tokenizer)
    rule = f"ceil({share} x {n_avail} rows){f', at most {max_tokens} tokens' if max_tokens else ''}, seed {held_seed}"
    study.source["held_out"] = {"hash": held.hash, "n_rows": held.n_rows, "rule": rule}
    held.source["held_out_from"] = {"hash": study.hash, "n_rows": study.n_rows, "disjoint_rows": True, "rule": rule}
    return study, held
