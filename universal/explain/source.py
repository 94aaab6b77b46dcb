"""Where the explanations engine reads activations: activation stores of one token set
(`StoreSource`) or live models over a token set (`LiveModelSource`), both giving batches of
whole rows with their token ids, mask and the activations of a chosen list of neurons."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import torch

from universal_neurons.activations import (
    ActivationStore,
    CheckedDataset,
    LoadedModel,
    TokenSet,
    hook_name,
    mlp_activations,
)
from universal_neurons.errors import IncompatibleInputsError, InputError

__all__ = ["Unit", "Batch", "StoreSource", "LiveModelSource"]


@dataclass(frozen=True, order=True)
class Unit:
    """One neuron of one model of the family: `label` (a, b, ...), `layer`, `neuron`."""

    label: str
    layer: int
    neuron: int

    def __str__(self) -> str:
        return f"{self.label}:{self.layer}.{self.neuron}"


class Batch(NamedTuple):
    """Rows `r0 .. r0 + rows - 1` of the token set.

    `ids`: `Int[Tensor, "row pos"]` int64; `mask`: `Bool[Tensor, "row pos"]` (True = counted);
    `acts`: `Float[Tensor, "token unit"]` float32, tokens in row order, one column per unit asked for.
    """

    r0: int
    ids: torch.Tensor
    mask: torch.Tensor
    acts: torch.Tensor


def _by_hook(units: Sequence[Unit]) -> dict[tuple[str, int], tuple[list[int], list[int]]]:
    """(label, layer) -> (output columns, neurons), so each hook is read once per batch."""
    out: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
    for col, u in enumerate(units):
        cols, neurons = out.setdefault((u.label, u.layer), ([], []))
        cols.append(col)
        neurons.append(u.neuron)
    return out


def _row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique rows as runs `[(first, stop), ...]` of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for r in rows.tolist():
        if runs and runs[-1][1] == r:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


class StoreSource:
    """Activation stores of one token set, by model label (reference first).

    Args:
        stores: label -> store path (`cache_activations`), all of the same token set.

    Raises:
        IncompatibleInputsError: the stores hold different token sets.
        InputNotFoundError / UniversalNeuronsError: a store is missing or unreadable.
    """

    def __init__(self, stores: Mapping[str, str | os.PathLike]) -> None:
        if not stores:
            raise InputError("no activation stores given; pass {label: store path}")
        self.paths = {lab: Path(p) for lab, p in stores.items()}
        self.labels = list(self.paths)
        self.info: dict[str, dict[str, Any]] = {}
        for lab, path in self.paths.items():
            with ActivationStore.open(path) as s:
                self.info[lab] = {"path": str(path.resolve()), "model": s.model, "dtype": s.config.dtype,
                                  "layers": list(s.layers), "hooks": list(s.hooks), "d_mlp": s.d_mlp,
                                  "token_set_hash": s.token_set_hash, "n_rows": s.n_tokens // s.ctx_len,
                                  "ctx_len": s.ctx_len, "tokenizer": s.tokenizer}
        hashes = {lab: i["token_set_hash"] for lab, i in self.info.items()}
        if len(set(hashes.values())) > 1:
            raise IncompatibleInputsError(f"the stores hold different token sets ({hashes}); cache every model on "
                                          "the same token set")
        first = self.info[self.labels[0]]
        self.token_set_hash: str = first["token_set_hash"]
        self.n_rows, self.ctx_len = int(first["n_rows"]), int(first["ctx_len"])
        self.n_tokens = self.n_rows * self.ctx_len
        # float16 stores hold float16 values: their 16-bit keys are exact and one histogram pass finds quantiles
        self.bits = 16 if all(i["dtype"] == "float16" for i in self.info.values()) else 32
        self.special_ids = sorted({int(v) for v in (first["tokenizer"].get(k) for k in
                                   ("bos_token_id", "eos_token_id", "pad_token_id")) if v is not None})

    def check_units(self, units: Sequence[Unit]) -> None:
        """Refuse units whose model, hook or neuron the stores lack (before any pass)."""
        for u in units:
            info = self.info.get(u.label)
            if info is None:
                raise InputError(f"no store for model {u.label!r} (stores: {self.labels})")
            if hook_name(u.layer, "post") not in info["hooks"]:
                raise InputError(f"{info['path']} has no {hook_name(u.layer, 'post')} (it holds {info['hooks']})")
            if not 0 <= u.neuron < info["d_mlp"]:
                raise InputError(f"neuron {u} does not exist; layers of {u.label} have {info['d_mlp']} neurons")

    def describe(self) -> dict[str, Any]:
        """What the provenance records: the stores' paths, models and dtypes, the token set."""
        return {"kind": "stores", "token_set_hash": self.token_set_hash, "n_tokens": self.n_tokens,
                "ctx_len": self.ctx_len,
                "stores": {lab: {k: i[k] for k in ("path", "model", "dtype")} for lab, i in self.info.items()}}

    def batches(self, units: Sequence[Unit], *, rows: tuple[int, int] | None = None, batch_rows: int = 32,
                device: torch.device | None = None) -> Iterator[Batch]:
        """Batches of `batch_rows` rows over `rows = (r0, r1)` (default all), in order."""
        r0, r1 = rows if rows is not None else (0, self.n_rows)
        plan = _by_hook(units)
        dev = device or torch.device("cpu")
        opened = {lab: ActivationStore.open(p) for lab, p in self.paths.items()}
        per_token = _PerToken(self.paths[self.labels[0]])
        try:
            ctx = self.ctx_len
            for a in range(r0, r1, batch_rows):
                b = min(a + batch_rows, r1)
                t0, t1 = a * ctx, b * ctx
                ids = per_token["token_ids"][t0:t1]
                mask = per_token["mask"][t0:t1].astype(bool)
                acts = np.empty((t1 - t0, len(units)), np.float32)
                for (lab, layer), (cols, neurons) in plan.items():
                    block = opened[lab][hook_name(layer, "post")][t0:t1]
                    acts[:, cols] = block[:, neurons]
                yield Batch(a, torch.from_numpy(ids.reshape(b - a, ctx).astype(np.int64)).to(dev),
                            torch.from_numpy(mask.reshape(b - a, ctx)).to(dev), torch.from_numpy(acts).to(dev))
        finally:
            per_token.close()
            for s in opened.values():
                s.close()

    def read_rows(self, rows: np.ndarray, units: Sequence[Unit]) -> tuple[np.ndarray, np.ndarray]:
        """Whole rows, for the examples' contexts.

        Args:
            rows: sorted unique row indices.
            units: the neurons to read.

        Returns:
            `(ids: Int[ndarray, "row pos"], acts: Float[ndarray, "row pos unit"])`.
        """
        ctx, plan = self.ctx_len, _by_hook(units)
        ids = np.empty((len(rows), ctx), np.int64)
        acts = np.empty((len(rows), ctx, len(units)), np.float32)
        opened = {lab: ActivationStore.open(p) for lab, p in self.paths.items()}
        per_token = _PerToken(self.paths[self.labels[0]])
        try:
            i = 0
            for a, b in _row_runs(np.asarray(rows)):
                n = b - a
                ids[i:i + n] = per_token["token_ids"][a * ctx:b * ctx].reshape(n, ctx)
                for (lab, layer), (cols, neurons) in plan.items():
                    block = opened[lab][hook_name(layer, "post")][a * ctx:b * ctx][:, neurons]
                    acts[i:i + n][:, :, cols] = block.reshape(n, ctx, len(neurons))
                i += n
        finally:
            per_token.close()
            for s in opened.values():
                s.close()
        return ids, acts


class _PerToken:
    """The per-token datasets of a store (`token_ids`, `mask`), read a slice at a time with their
    checksums checked (`ActivationStore.token_ids` reads them whole)."""

    def __init__(self, path: Path) -> None:
        import h5py

        self.path, self.file = path, h5py.File(path, "r")

    def __getitem__(self, name: str) -> CheckedDataset:
        return CheckedDataset(self.file[name], self.path)

    def close(self) -> None:
        self.file.close()


class LiveModelSource:
    """Live models of one family over one token set: the same batches, nothing cached.

    Args:
        models: label -> `LoadedModel`, reference first.
        token_set: the rows.
    """

    bits = 32  # live activations are float32

    def __init__(self, models: Mapping[str, LoadedModel], token_set: TokenSet) -> None:
        if not models:
            raise InputError("no models given; pass {label: LoadedModel}")
        self.models, self.token_set = dict(models), token_set
        self.labels = list(self.models)
        self.token_set_hash = token_set.hash
        self.n_rows, self.ctx_len, self.n_tokens = token_set.n_rows, token_set.ctx_len, token_set.n_tokens
        info = token_set.tokenizer_info
        self.special_ids = sorted({int(info[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                   if info.get(k) is not None})

    def check_units(self, units: Sequence[Unit]) -> None:
        """Refuse units whose model, layer or neuron does not exist."""
        for u in units:
            lm = self.models.get(u.label)
            if lm is None:
                raise InputError(f"no model {u.label!r} (models: {self.labels})")
            if not (0 <= u.layer < lm.n_layers and 0 <= u.neuron < lm.d_mlp):
                raise InputError(f"neuron {u} does not exist in {lm.name} ({lm.n_layers} layers x {lm.d_mlp})")

    def describe(self) -> dict[str, Any]:
        """What the provenance records: the models' provenance and the token set."""
        return {"kind": "live", "token_set_hash": self.token_set_hash, "n_tokens": self.n_tokens,
                "ctx_len": self.ctx_len,
                "models": {lab: lm.provenance for lab, lm in self.models.items()}}

    def _acts(self, ids: np.ndarray, plan, n_units: int) -> np.ndarray:
        """`[token, unit]` float32 activations of rows `ids`, each model run once for its layers."""
        toks = torch.from_numpy(ids).long()
        out = np.empty((ids.size, n_units), np.float32)
        layers: dict[str, list[int]] = {}
        for lab, layer in plan:
            layers.setdefault(lab, []).append(layer)
        for lab, ls in layers.items():
            got = mlp_activations(self.models[lab], toks, layers=sorted(set(ls)))
            for layer in ls:
                cols, neurons = plan[(lab, layer)]
                a = got[hook_name(layer, "post")].reshape(-1, self.models[lab].d_mlp)[:, neurons]
                out[:, cols] = a.float().cpu().numpy()
        return out

    def batches(self, units: Sequence[Unit], *, rows: tuple[int, int] | None = None, batch_rows: int = 32,
                device: torch.device | None = None) -> Iterator[Batch]:
        """Batches of `batch_rows` rows over `rows = (r0, r1)` (default all), in order."""
        r0, r1 = rows if rows is not None else (0, self.n_rows)
        plan, dev = _by_hook(units), device or torch.device("cpu")
        for a in range(r0, r1, batch_rows):
            b = min(a + batch_rows, r1)
            ids = self.token_set.ids[a:b]
            acts = self._acts(ids, plan, len(units))
            yield Batch(a, torch.from_numpy(ids.astype(np.int64)).to(dev),
                        torch.from_numpy(self.token_set.mask[a:b].copy()).to(dev), torch.from_numpy(acts).to(dev))

    def read_rows(self, rows: np.ndarray, units: Sequence[Unit]) -> tuple[np.ndarray, np.ndarray]:
        """Whole rows (`StoreSource.read_rows`), computed again by the models."""
        ids = self.token_set.ids[np.asarray(rows, np.int64)]
        acts = self._acts(ids, _by_hook(units), len(units)) if len(rows) else np.empty((0, len(units)), np.float32)
        return ids.astype(np.int64), acts.reshape(len(rows), self.ctx_len, len(units))
