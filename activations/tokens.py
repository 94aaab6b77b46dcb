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
from typing import Any, Iterator, Sequence

import numpy as np

from universal_neurons.artifacts import atomic_path
from universal_neurons.config import Config
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError, UniversalNeuronsError
from universal_neurons.runtime import SCHEMA_VERSION, from_json, hub_reachable, progress, provenance_base, to_json

__all__ = ["TokenSetConfig", "TokenSet", "build_token_set", "build_study_and_held_out", "load_token_set",
           "tokenizer_info", "newline_ids"]

log = logging.getLogger(__name__)

_KIND = "token_set"


@dataclass(frozen=True)
class TokenSetConfig(Config):
    """How a token set is cut, sampled and masked. Stored in the token set's attributes."""

    ctx_len: int = 256  # the paper uses 512; 256 keeps CPU runs of small models fast
    n_tokens: int | None = None  # tokens to keep, rounded down to whole rows; None = every row
    seed: int = 0  # seeds the random choice (and order) of rows
    shuffle: bool = False  # False: the sampled rows stay in stream order
    exclude_bos: bool = True  # position 0 of every row
    exclude_special: bool = True  # EOS / pad / BOS ids anywhere in a row
    exclude_newlines: bool = True  # the paper excludes new-line tokens
    newline_ids: tuple[int, ...] | None = None  # None = every id that decodes to whitespace containing '\n'
    extra_exclude_ids: tuple[int, ...] = ()  # further ids to mask out
    text_field: str = "text"  # field of each .jsonl record / Hugging Face dataset row
    hf_split: str = "train"  # split of an `hf:<dataset>` source

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


def newline_ids(tokenizer) -> tuple[int, ...]:
    """Every token id whose decoded string is only whitespace and contains a newline."""
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
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
            raise UniversalNeuronsError(f"ids must have shape (rows, ctx_len={self.config.ctx_len}), got {self.ids.shape}")
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
        import h5py

        with atomic_path(path, overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
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
        if not path.is_file():
            raise UniversalNeuronsError(f"no token set at {path}; build one with build_token_set(...).save(path) "
                                        "or `universal-neurons tokenize`")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise UniversalNeuronsError(f"{path} is not a readable HDF5 file ({e})") from e
        with f:
            if f.attrs.get("kind") != _KIND:
                raise UniversalNeuronsError(f"{path} is not a token set (kind={f.attrs.get('kind')!r})")
            if int(f.attrs["schema_version"]) != SCHEMA_VERSION:
                raise UniversalNeuronsError(f"{path} has schema version {f.attrs['schema_version']}, this toolkit "
                                            f"reads {SCHEMA_VERSION}; rebuild the token set")
            ts = cls(ids=f["ids"][()], mask=f["mask"][()], doc_index=f["doc_index"][()],
                     source_rows=f["source_rows"][()],
                     config=TokenSetConfig.from_dict(from_json(f.attrs["token_set_config"])),
                     tokenizer_info=from_json(f.attrs["tokenizer"]), source=from_json(f.attrs["token_set_source"]))
            stored = str(f.attrs["token_set_hash"])
        if ts.hash != stored:
            raise UniversalNeuronsError(f"{path} is corrupt: its content hash {ts.hash} differs from the recorded {stored}")
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


# ---------------------------------------------------------------------------- reading text


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UniversalNeuronsError(f"{path} line {n} is not valid JSON ({e})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise UniversalNeuronsError(
                    f"{path} line {n} has no string field {field!r}; set TokenSetConfig(text_field=...) to the "
                    f"field holding the text (this record has {sorted(rec) if isinstance(rec, dict) else type(rec).__name__})")
            docs.append(rec[field])
    return docs


def _read_hf(name: str, config: TokenSetConfig) -> list[str]:
    spec = name[len("hf:"):]
    ds_name, _, ds_config = spec.partition(":")
    offline = any(os.environ.get(k, "0") not in ("0", "", "false", "False")
                  for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    reachable = hub_reachable("HF_DATASETS_OFFLINE")
    if not reachable:
        raise UniversalNeuronsError(
            f"cannot read Hugging Face dataset {ds_name!r}: the hub is unreachable from this machine"
            f"{' (offline mode is set)' if offline else ''}. Pass local .txt/.jsonl files or a folder of them instead.")
    try:
        import datasets
    except ImportError as e:
        raise UniversalNeuronsError(
            f"reading {name!r} needs the `datasets` package (pip install datasets); or pass local .txt/.jsonl files") from e
    try:
        ds = datasets.load_dataset(ds_name, ds_config or None, split=config.hf_split)
    except Exception as e:  # noqa: BLE001 - any hub/dataset failure has the same fix
        raise UniversalNeuronsError(f"could not load Hugging Face dataset {spec!r} split {config.hf_split!r}: {e}. "
                                    "Pass local .txt/.jsonl files instead.") from e
    if config.text_field not in ds.column_names:
        raise UniversalNeuronsError(f"dataset {spec!r} has no column {config.text_field!r} (it has {ds.column_names}); "
                                    "set TokenSetConfig(text_field=...)")
    return list(ds[config.text_field])


def _read_source(source, config: TokenSetConfig) -> tuple[list[str], dict[str, Any]]:
    """Documents (one string each) and a description of where they came from."""
    if isinstance(source, str) and source.startswith("hf:"):
        return _read_hf(source, config), {"kind": "hf", "name": source, "split": config.hf_split}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise UniversalNeuronsError(f"text source {path} does not exist; pass a .txt/.jsonl file, a folder of "
                                        "them, a list of strings, or 'hf:<dataset>'")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()) \
            if path.is_dir() else [path]
        if not files:
            raise UniversalNeuronsError(f"folder {path} holds no .txt or .jsonl files")
        docs: list[str] = []
        for f in files:
            if f.suffix == ".jsonl":
                docs.extend(_read_jsonl(f, config.text_field))
            else:
                docs.append(f.read_text(encoding="utf-8"))
        return docs, {"kind": "files", "path": str(path.resolve()), "files": [str(f.relative_to(path)) if path.is_dir()
                                                                             else f.name for f in files]}
    if isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        return list(source), {"kind": "strings"}
    raise UniversalNeuronsError(f"unsupported text source of type {type(source).__name__}; pass a path, a list of "
                                "strings or 'hf:<dataset>'")


# ---------------------------------------------------------------------------- building


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
    docs, src = _read_source(source, config)
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
    nl = config.newline_ids if config.newline_ids is not None else newline_ids(tokenizer)
    if config.exclude_newlines:
        excluded |= set(nl)
    mask = ~np.isin(ids, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
    if config.exclude_bos:
        mask[:, 0] = False
    src = {**stream.source, "n_documents": stream.n_documents, "n_stream_tokens": int(len(stream.ids)),
           "n_rows_available": int(stream.n_rows(config.ctx_len)),
           "row_order": "shuffled" if config.shuffle else "stream", "bos_token_id": stream.bos,
           "eos_token_id": stream.eos, "excluded_ids": sorted(int(i) for i in excluded),
           "newline_ids": [int(i) for i in nl]}
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
