"""Stage 1, tokens: text in, one fixed token set (HDF5) out, shared by every model of a family.

A token set is rows of `ctx_len` token ids. Documents are tokenised with the family's
tokenizer and joined with the end-of-text separator *kept* between them (TransformerLens'
`tokenize_and_concatenate` deletes it for GPT-2); the joined stream is cut into rows of
`[BOS] + ctx_len - 1` stream tokens; the incomplete tail is dropped, nothing is padded.
A seeded random subset of rows is kept. Positions that no statistic should count (BOS,
EOS/pad, newline tokens) are marked in a mask, never deleted (docs/method.md §2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from universal_neurons.artifacts import hdf5_file, reading
from universal_neurons.config import Config
from universal_neurons.errors import (
    ConfigError,
    CorruptFileError,
    InputError,
    InputNotFoundError,
    UniversalNeuronsError,
)
from universal_neurons.runtime import SCHEMA_VERSION, from_json, provenance_base, to_json

__all__ = ["TokenSetConfig", "TokenSet", "load_token_set", "content_hash", "tokenizer_info", "newline_ids",
           "NEWLINE_MASKS"]

log = logging.getLogger(__name__)

_KIND = "token_set"
NEWLINE_MASKS = ("paper", "all")


@dataclass(frozen=True)
class TokenSetConfig(Config):
    """How a token set is cut, sampled and masked. Stored in the token set's attributes."""

    ctx_len: int = 512  # the paper's row length, BOS included (the built-in demo family uses its own 256)
    n_tokens: int | None = None  # tokens to keep, rounded down to whole rows; None = every row
    seed: int = 0  # seeds the random choice (and order) of rows
    shuffle: bool = False  # False: the sampled rows stay in stream order
    exclude_bos: bool = True  # position 0 of every row
    exclude_special: bool = True  # EOS / pad / BOS ids anywhere in a row
    exclude_newlines: bool = True  # the paper excludes new-line tokens
    newline_mask: str = "paper"  # "paper": the ids that decode to exactly "\n" (GPT-2: 198, not "\n\n" = 628);
    # "all": every id that decodes to whitespace containing a newline
    newline_ids: tuple[int, ...] | None = None  # explicit ids instead of the newline_mask rule
    extra_exclude_ids: tuple[int, ...] = ()  # further ids to mask out
    text_field: str = "text"  # field of each .jsonl record / Hugging Face dataset row
    hf_split: str = "train"  # split of an `hf:<dataset>` source
    encoding_errors: str = "strict"  # text files that are not valid UTF-8: "strict" refuses them, "replace" uses U+FFFD

    def __post_init__(self) -> None:
        bad = self.fail
        if not isinstance(self.ctx_len, int) or self.ctx_len < 2:
            bad(f"ctx_len must be an integer >= 2 (BOS plus at least one token), got {self.ctx_len!r}")
        if self.n_tokens is not None and (not isinstance(self.n_tokens, int) or self.n_tokens < self.ctx_len):
            bad(f"n_tokens must be None or an integer >= ctx_len={self.ctx_len} (one whole row), got {self.n_tokens!r}")
        if not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        for name in ("newline_ids", "extra_exclude_ids"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, (str, bytes)) or not all(isinstance(i, (int, np.integer)) and i >= 0 for i in v):
                bad(f"{name} must be a sequence of non-negative token ids, got {v!r}")
            object.__setattr__(self, name, tuple(int(i) for i in v))
        if not isinstance(self.text_field, str) or not self.text_field:
            bad(f"text_field must be a non-empty string, got {self.text_field!r}")
        if self.newline_mask not in NEWLINE_MASKS:
            bad(f"newline_mask must be one of {NEWLINE_MASKS}, got {self.newline_mask!r}")
        if self.encoding_errors not in ("strict", "replace"):
            bad(f"encoding_errors must be 'strict' or 'replace', got {self.encoding_errors!r}")


# ---------------------------------------------------------------------------- tokenizer facts


def tokenizer_info(tokenizer) -> dict[str, Any]:
    """The tokenizer's identity: `name_or_path`, a sha256 `fingerprint` of its vocab + merges
    JSON, its vocabulary size and its BOS/EOS/pad ids."""
    vocab, merges = None, []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        vocab = model.get("vocab")
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        if isinstance(vocab, list):  # unigram models list (piece, score) pairs
            vocab = {str(p[0]): i for i, p in enumerate(vocab)}
    if vocab is None:
        vocab = tokenizer.get_vocab()
    blob = json.dumps({"vocab": vocab, "merges": merges}, sort_keys=True, ensure_ascii=False)
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "fingerprint": hashlib.sha256(blob.encode()).hexdigest(),
        "vocab_size": int(len(tokenizer)),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def newline_ids(tokenizer, rule: str = "paper") -> tuple[int, ...]:
    """The newline token ids a mask excludes.

    Args:
        tokenizer: the family's tokenizer.
        rule: `"paper"`, the ids whose decoded string is exactly `"\n"` (the paper masked
            GPT-2's id 198 only; `"\n\n"`, id 628, is common in the Pile and was counted), or
            `"all"`, every id whose decoded string is only whitespace and contains a newline.

    Returns:
        The ids, ascending.
    """
    if rule not in NEWLINE_MASKS:
        raise ConfigError(f"unknown newline mask {rule!r}; use one of {NEWLINE_MASKS}")
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    if rule == "paper":
        return tuple(i for i, s in enumerate(texts) if s == "\n")
    return tuple(i for i, s in enumerate(texts) if "\n" in s and not s.strip())


# ---------------------------------------------------------------------------- the token set


@dataclass(eq=False)
class TokenSet:
    """A fixed set of token rows with their mask.

    **Fields**
    - `ids`: `Int[ndarray, "row pos"]` int32; `ids[:, 0]` is BOS.
    - `mask`: `Bool[ndarray, "row pos"]`, True = counted by every statistic.
    - `doc_index`: `Int[ndarray, "row pos"]` int32, the source document of each token
      (an EOS separator belongs to the document it ends; BOS is -1).
    - `source_rows`: `Int[ndarray, "row"]`, each row's index in the full cut stream.
    - `config`, `tokenizer_info` (see `tokenizer_info`), `source` (what was read).
    """

    ids: np.ndarray
    mask: np.ndarray
    doc_index: np.ndarray
    source_rows: np.ndarray
    config: TokenSetConfig
    tokenizer_info: dict[str, Any]
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = np.ascontiguousarray(self.ids, dtype=np.int32)
        self.mask = np.ascontiguousarray(self.mask, dtype=bool)
        self.doc_index = np.ascontiguousarray(self.doc_index, dtype=np.int32)
        self.source_rows = np.ascontiguousarray(self.source_rows, dtype=np.int64)
        if self.ids.ndim != 2 or self.ids.shape[1] != self.config.ctx_len:
            raise UniversalNeuronsError(
                f"ids must have shape (rows, ctx_len={self.config.ctx_len}), got {self.ids.shape}")
        if self.mask.shape != self.ids.shape or self.doc_index.shape != self.ids.shape:
            raise UniversalNeuronsError(
                f"mask {self.mask.shape} and doc_index {self.doc_index.shape} must match ids {self.ids.shape}")
        self._hash: str | None = None

    @property
    def n_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def ctx_len(self) -> int:
        return int(self.ids.shape[1])

    @property
    def n_tokens(self) -> int:
        """All positions, masked or not (rows * ctx_len)."""
        return int(self.ids.size)

    @property
    def n_counted(self) -> int:
        """Positions the mask keeps."""
        return int(self.mask.sum())

    @property
    def hash(self) -> str:
        """sha256 of ctx_len, ids and mask: two token sets with the same hash feed models the same tokens."""
        if self._hash is None:
            self._hash = content_hash(self.ids, self.mask)
        return self._hash

    def select_rows(self, start: int, stop: int) -> "TokenSet":
        """Rows `start:stop` as a token set of their own (a shard, or a held-out slice); the
        rows' place in the parent is recorded in `source['rows']`."""
        return TokenSet(ids=self.ids[start:stop], mask=self.mask[start:stop], doc_index=self.doc_index[start:stop],
                        source_rows=self.source_rows[start:stop], config=self.config,
                        tokenizer_info=self.tokenizer_info, source={**self.source, "rows": [int(start), int(stop)]})

    def batches(self, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Consecutive blocks of rows, in order.

        Returns:
            an iterator of `(ids: Int[ndarray, "batch pos"], mask: Bool[ndarray, "batch pos"])`;
            the last block may be shorter.
        """
        if not isinstance(batch_rows, int) or batch_rows < 1:
            raise UniversalNeuronsError(f"batch_rows must be a positive integer, got {batch_rows!r}")
        for r in range(0, self.n_rows, batch_rows):
            yield self.ids[r:r + batch_rows], self.mask[r:r + batch_rows]

    def attrs(self) -> dict[str, str]:
        """The JSON attributes describing this token set (also copied into activation stores)."""
        return {
            "token_set_hash": self.hash,
            "token_set_config": to_json(self.config.to_dict()),
            "tokenizer": to_json(self.tokenizer_info),
            "token_set_source": to_json(self.source),
        }

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the token set to one HDF5 file (via a temporary file, renamed when complete)."""

        with hdf5_file(path, overwrite=overwrite) as f:
            for name in ("ids", "mask", "doc_index"):
                d = f.create_dataset(name, data=getattr(self, name))
                d.dims[0].label, d.dims[1].label = "row", "pos"
            f.create_dataset("source_rows", data=self.source_rows).dims[0].label = "row"
            prov = provenance_base(_KIND)
            f.attrs.update(self.attrs())
            f.attrs.update({"kind": _KIND, "schema_version": SCHEMA_VERSION, "provenance": to_json(prov),
                            "n_rows": self.n_rows, "ctx_len": self.ctx_len})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TokenSet":
        """Read a token set written by `save`; its content hash is re-checked."""
        import h5py

        path = Path(path)
        fix = "build one with `universal-neurons tokenize` (build_token_set(...).save(path))"
        if not path.is_file():
            raise InputNotFoundError(f"no token set at {path}; {fix}")
        with reading(path, "token set", fix), h5py.File(path, "r") as f:
            if f.attrs.get("kind") != _KIND:
                raise InputError(f"{path} is not a token set (kind={f.attrs.get('kind')!r}); {fix}")
            if int(f.attrs["schema_version"]) != SCHEMA_VERSION:
                raise UniversalNeuronsError(f"{path} has schema version {f.attrs['schema_version']}, this toolkit "
                                            f"reads {SCHEMA_VERSION}; rebuild the token set")
            ts = cls(ids=f["ids"][()], mask=f["mask"][()], doc_index=f["doc_index"][()],
                     source_rows=f["source_rows"][()],
                     config=TokenSetConfig.from_dict(from_json(f.attrs["token_set_config"])),
                     tokenizer_info=from_json(f.attrs["tokenizer"]), source=from_json(f.attrs["token_set_source"]))
            stored = str(f.attrs["token_set_hash"])
        if ts.hash != stored:
            raise CorruptFileError(f"{path} is corrupt: its content hash {ts.hash} differs from the recorded "
                                   f"{stored}; build the token set again (`universal-neurons tokenize`)")
        return ts


def content_hash(ids: np.ndarray, mask: np.ndarray) -> str:
    """sha256 over `ctx_len`, the int32 ids and the uint8 mask, all `[row, pos]` in row order."""
    h = hashlib.sha256()
    h.update(f"ctx_len={ids.shape[-1]};".encode())
    h.update(np.ascontiguousarray(ids, dtype="<i4").tobytes())
    h.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return h.hexdigest()


def load_token_set(path: str | os.PathLike) -> TokenSet:
    """`TokenSet.load(path)`."""
    return TokenSet.load(path)
