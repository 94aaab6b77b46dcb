"""Reading text for token sets: files (`.txt`, `.jsonl`), folders of them, lists of strings,
or a Hugging Face dataset (`hf:<name>[:<config>]`). Text files must be valid UTF-8 unless
the token set's `encoding_errors="replace"` says otherwise; a bad byte is an error that
names the file and the byte offset."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from universal_neurons.errors import InputError, InputNotFoundError, UniversalNeuronsError
from universal_neurons.runtime import hub_reachable

from .tokens import TokenSetConfig

__all__ = ["read_documents", "read_text_file"]


def read_text_file(path: Path, config: TokenSetConfig) -> str:
    """The text of `path`, decoded as UTF-8 with `config.encoding_errors`.

    Raises:
        InputError: the file is not valid UTF-8 (strict), naming the byte offset and the fix.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8", errors=config.encoding_errors)
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not valid UTF-8: byte offset {e.start} ({data[e.start:e.start + 1]!r}) "
                         f"cannot be decoded; convert the file to UTF-8, or pass --encoding-errors replace "
                         f"(encoding_errors='replace') to read it with U+FFFD in place of bad bytes") from None


def _read_jsonl(path: Path, config: TokenSetConfig) -> list[str]:
    field = config.text_field
    docs = []
    for n, line in enumerate(read_text_file(path, config).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {n} is not valid JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            has = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise InputError(f"{path} line {n} has no string field {field!r}; set --text-field "
                             f"(TokenSetConfig(text_field=...)) to the field holding the text (this record has {has})")
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
        raise UniversalNeuronsError(f"reading {name!r} needs the `datasets` package (pip install datasets); "
                                    "or pass local .txt/.jsonl files") from e
    try:
        ds = datasets.load_dataset(ds_name, ds_config or None, split=config.hf_split)
    except Exception as e:  # noqa: BLE001 - any hub/dataset failure has the same fix
        raise UniversalNeuronsError(f"could not load Hugging Face dataset {spec!r} split {config.hf_split!r}: {e}. "
                                    "Pass local .txt/.jsonl files instead.") from e
    if config.text_field not in ds.column_names:
        raise UniversalNeuronsError(f"dataset {spec!r} has no column {config.text_field!r} (it has {ds.column_names}); "
                                    "set TokenSetConfig(text_field=...)")
    return list(ds[config.text_field])


def read_documents(source, config: TokenSetConfig) -> tuple[list[str], dict[str, Any]]:
    """Documents (one string each) and a description of where they came from."""
    if isinstance(source, str) and source.startswith("hf:"):
        return _read_hf(source, config), {"kind": "hf", "name": source, "split": config.hf_split}
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise InputNotFoundError(f"text source {path} does not exist; pass a .txt/.jsonl file, a folder of "
                                        "them, a list of strings, or 'hf:<dataset>'")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file()) \
            if path.is_dir() else [path]
        if not files:
            raise UniversalNeuronsError(f"folder {path} holds no .txt or .jsonl files")
        docs: list[str] = []
        for f in files:
            if f.suffix == ".jsonl":
                docs.extend(_read_jsonl(f, config))
            else:
                docs.append(read_text_file(f, config))
        return docs, {"kind": "files", "path": str(path.resolve()), "files": [str(f.relative_to(path)) if path.is_dir()
                                                                             else f.name for f in files]}
    if isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        return list(source), {"kind": "strings"}
    raise UniversalNeuronsError(f"unsupported text source of type {type(source).__name__}; pass a path, a list of "
                                "strings or 'hf:<dataset>'")


