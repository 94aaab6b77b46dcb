"""Reading activation stores: lazy, dict-like access to the HDF5 file `cache_activations`
writes, with every read checked against the chunks' checksums.

    with ActivationStore.open("a.h5") as store:
        acts = store["blocks.1.mlp.hook_post"][0:4096]     # Float[ndarray, "token neuron"]
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from universal_neurons.errors import CorruptFileError, UniversalNeuronsError
from universal_neurons.runtime import SCHEMA_VERSION, from_json

from .hooks import hook_name, parse_hook_name
from .store import STORE_KIND, StoreConfig
from .tokens import TokenSetConfig

__all__ = ["ActivationStore", "CheckedDataset"]

@contextlib.contextmanager
def _checked_read(path: Path, what: str) -> Iterator[None]:
    """Turn HDF5's read failure of a chunk (its Fletcher-32 checksum does not match, or the
    bytes cannot be decoded) into a `CorruptFileError` that names the file."""
    try:
        yield
    except OSError as e:
        if isinstance(e, UniversalNeuronsError):
            raise
        raise CorruptFileError(
            f"{path}: reading {what} failed ({e}); the file is corrupted (a checksum does not match its data). "
            "Cache these activations again (`universal-neurons cache ... --overwrite`)") from e


class CheckedDataset:
    """An h5py dataset of a store whose reads raise `CorruptFileError` on a bad chunk.

    Slicing (`ds[a:b]`), `read_direct` and `np.asarray(ds)` are checked; every other attribute
    (`shape`, `dtype`, `chunks`, `attrs`, `dims`, ...) is the dataset's own.
    """

    def __init__(self, dataset, path: Path) -> None:
        self._ds, self._path = dataset, path

    def __getitem__(self, selection):
        with _checked_read(self._path, self._ds.name):
            return self._ds[selection]

    def read_direct(self, *args, **kwargs) -> None:
        with _checked_read(self._path, self._ds.name):
            self._ds.read_direct(*args, **kwargs)

    def __array__(self, dtype=None, copy=None):
        arr = self[()]
        return arr if dtype is None else arr.astype(dtype)

    def __len__(self) -> int:
        return len(self._ds)

    def __getattr__(self, name: str):
        return getattr(self._ds, name)


class ActivationStore:
    """A finished activation store, read lazily.

    `store["blocks.3.mlp.hook_post"][a:b]` is an h5py dataset slice: `Float[ndarray, "token neuron"]`
    of tokens a..b-1 (rows * ctx_len flattened in row order), in the stored dtype.
    Use as a context manager or call `close()`.
    """

    def __init__(self, path: Path, file) -> None:
        self.path, self._f = path, file
        a = file.attrs
        self.provenance: dict[str, Any] = from_json(a["provenance"])
        self.model: dict[str, Any] = from_json(a["model"])
        self.config = StoreConfig.from_dict(from_json(a["store_config"]))
        self.token_set_hash: str = str(a["token_set_hash"])
        self.token_set_config = TokenSetConfig.from_dict(from_json(a["token_set_config"]))
        self.tokenizer: dict[str, Any] = from_json(a["tokenizer"])
        self.layers: list[int] = [int(layer) for layer in a["layers"]]
        self.n_layers, self.d_mlp = int(a["n_layers"]), int(a["d_mlp"])
        self.n_tokens, self.ctx_len = int(a["n_tokens"]), int(a["ctx_len"])
        self.hooks: list[str] = sorted((k for k in file if k.startswith("blocks.")), key=parse_hook_name)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationStore":
        """Open a finished store for reading (errors say what is missing and how to make it)."""
        import h5py

        path = Path(path)
        if not path.is_file():
            partial = path.with_name(path.name + ".partial")
            hint = (f"; an unfinished run left {partial}: run cache_activations again to resume it"
                    if partial.exists() else "; write it with cache_activations (`universal-neurons cache`)")
            raise UniversalNeuronsError(f"no activation store at {path}{hint}")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise UniversalNeuronsError(f"{path} is not a readable HDF5 file ({e})") from e
        try:
            if f.attrs.get("kind") != STORE_KIND:
                raise UniversalNeuronsError(f"{path} is not an activation store (kind={f.attrs.get('kind')!r})")
            if int(f.attrs["schema_version"]) != SCHEMA_VERSION:
                raise UniversalNeuronsError(f"{path} has schema version {int(f.attrs['schema_version'])}; this "
                                            f"toolkit reads {SCHEMA_VERSION}. Cache the activations again")
            if int(f.attrs["complete_rows"]) != int(f.attrs["n_rows"]):
                raise UniversalNeuronsError(f"{path} is incomplete ({int(f.attrs['complete_rows'])} of "
                                            f"{int(f.attrs['n_rows'])} rows); cache it again")
            return cls(path, f)
        except BaseException:
            f.close()
            raise

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.model.get('name')!r}, "
                f"checkpoint={self.model.get('checkpoint')}, n_tokens={self.n_tokens}, hooks={len(self.hooks)}, "
                f"dtype={self.config.dtype}, token_set={self.token_set_hash[:12]})")

    def __getitem__(self, hook: str):
        if hook not in self.hooks:
            raise UniversalNeuronsError(f"{self.path} has no {hook!r}; it holds {self.hooks}")
        return CheckedDataset(self._f[hook], self.path)

    def __contains__(self, hook: str) -> bool:
        return hook in self.hooks

    def neuron(self, layer: int, i: int, kind: str = "post") -> np.ndarray:
        """`Float[ndarray, "token"]`: neuron `i` of `layer` over every token."""
        if not 0 <= int(i) < self.d_mlp:
            raise UniversalNeuronsError(f"neuron {i} does not exist; layers have {self.d_mlp} neurons")
        return self[hook_name(layer, kind)][:, int(i)]

    @property
    def token_ids(self) -> np.ndarray:
        """`Int[ndarray, "token"]` int32, the ids every activation row belongs to."""
        return CheckedDataset(self._f["token_ids"], self.path)[()]

    @property
    def mask(self) -> np.ndarray:
        """`Bool[ndarray, "token"]`, True = counted by statistics."""
        return CheckedDataset(self._f["mask"], self.path)[()].astype(bool)

    @property
    def doc_index(self) -> np.ndarray:
        return CheckedDataset(self._f["doc_index"], self.path)[()]

    @property
    def chunk_tokens(self) -> int:
        ds = self._f[self.hooks[0]]
        # a stitched store's virtual datasets have no chunks; they carry their shards' chunk length
        return int(ds.chunks[0]) if ds.chunks is not None else int(ds.attrs.get("chunk_tokens", 1))
