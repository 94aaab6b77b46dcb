"""The result of a correlation run (`CorrelationResult`) and its HDF5 file."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from universal_neurons.artifacts import hdf5_file, reading
from universal_neurons.errors import ConfigError, InputError, InputNotFoundError
from universal_neurons.runtime import from_json, to_json

from .config import CorrelationConfig, ModelLayout

__all__ = ["CorrelationResult"]


@dataclass
class CorrelationResult:
    """Per reference neuron i and other model m: best partner, chance baseline, extras.

    Arrays indexed `[model, neuron]` have one row per model in `others` (in order) and
    one column per flat neuron of the reference (`layer * d_mlp + neuron`). Partners are
    flat indices into m (-1 = none); `partner_of(label)` splits them into (layer, neuron).
    Dead reference neurons have NaN values and partner -1. `var` is the population
    variance (divided by n_tokens) over the masked-in tokens.
    """

    reference: ModelLayout
    others: tuple[ModelLayout, ...]
    max_corr: np.ndarray                          # [model, neuron] max_j rho_ij (|rho| if config.absolute)
    partner: np.ndarray                           # [model, neuron] argmax j, flat index into m
    baseline: np.ndarray | None = None            # [model, neuron] max_j rho(x_i, u_j), u = chance units
    baseline_partner: np.ndarray | None = None    # [model, neuron]
    min_corr: np.ndarray | None = None            # [model, neuron] min_j rho_ij (always signed)
    top_k_corr: np.ndarray | None = None          # [model, neuron, k], best first, NaN padded
    top_k_partner: np.ndarray | None = None       # [model, neuron, k], -1 padded
    histogram: np.ndarray | None = None           # [model, neuron, bin] counts of rho_ij on hist_edges
    mean: dict[str, np.ndarray] = field(default_factory=dict)   # label -> [neuron]
    var: dict[str, np.ndarray] = field(default_factory=dict)    # label -> [neuron]
    dead: dict[str, np.ndarray] = field(default_factory=dict)   # label -> [neuron] bool
    n_tokens: int = 0
    config: CorrelationConfig = field(default_factory=CorrelationConfig)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.others = tuple(self.others)
        want = (len(self.others), self.reference.n_neurons)
        for name in ("max_corr", "partner", "baseline", "baseline_partner", "min_corr"):
            a = getattr(self, name)
            if a is not None:
                a = np.asarray(a)
                setattr(self, name, a)
                if a.shape != want:
                    raise ConfigError(f"CorrelationResult.{name} has shape {a.shape}; "
                                      f"expected [model, neuron] = {want}")

    @property
    def labels(self) -> list[str]:
        """The other models' labels, in the order of the `[model, ...]` axis."""
        return [m.label for m in self.others]

    def model_index(self, label: str) -> int:
        """Row of model `label` on the `[model, ...]` axis."""
        if label not in self.labels:
            raise ConfigError(f"no model {label!r} in this result; models are {self.labels}")
        return self.labels.index(label)

    def partner_of(self, label: str, *, baseline: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Each reference neuron's partner in model `label`.

        Args:
            label: the other model.
            baseline: the partner among the chance units instead.

        Returns:
            (layer, neuron), each `[neuron]` of the reference; -1 where none.
        """
        partners = self.baseline_partner if baseline else self.partner
        if partners is None:
            raise ConfigError("this result has no baseline (it was run with baseline='none')")
        flat = partners[self.model_index(label)]
        d = self.others[self.model_index(label)].d_mlp
        return np.where(flat >= 0, flat // d, -1), np.where(flat >= 0, flat % d, -1)

    @property
    def hist_edges(self) -> np.ndarray | None:
        """`[bin + 1]` edges of `histogram` on [-1, 1], or None without one."""
        if self.histogram is None:
            return None
        return np.linspace(-1.0, 1.0, self.histogram.shape[-1] + 1)

    @property
    def n_dead(self) -> dict[str, int]:
        """label -> number of dead neurons."""
        return {k: int(v.sum()) for k, v in self.dead.items()}

    # -- storage -------------------------------------------------------------
    _ARRAYS = ("max_corr", "partner", "baseline", "baseline_partner", "min_corr",
               "top_k_corr", "top_k_partner", "histogram")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write to one HDF5 file with provenance and config as JSON attributes, atomically.

        Raises:
            OutputExistsError: `path` exists and `overwrite` is False.
        """

        with hdf5_file(path, overwrite=overwrite) as f:
            f.attrs["provenance"] = to_json(self.provenance)
            f.attrs["config"] = to_json(self.config.to_dict())
            f.attrs["reference"] = to_json(dataclasses.asdict(self.reference))
            f.attrs["others"] = to_json([dataclasses.asdict(m) for m in self.others])
            f.attrs["n_tokens"] = int(self.n_tokens)
            for name in self._ARRAYS:
                a = getattr(self, name)
                if a is not None:
                    f.create_dataset(name, data=a, compression="gzip", compression_opts=1)
            for label in self.mean:
                g = f.create_group(f"models/{label}")
                g["mean"], g["var"], g["dead"] = self.mean[label], self.var[label], self.dead[label]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CorrelationResult":
        """Read a result written by `save`.

        Raises:
            InputNotFoundError: no file at `path`.
            InputError: the file holds another kind of artefact.
            ConfigError: its configuration has settings this version does not know.
        """
        import h5py

        if not os.path.exists(path):
            raise InputNotFoundError(f"no correlation result at {os.fspath(path)!r}; "
                                     "run correlate(...).save(path) first")
        with reading(path, "correlation result", "recompute it with `universal-neurons correlate`"), \
                h5py.File(path, "r") as f:
            prov = from_json(f.attrs["provenance"])
            if prov.get("artefact") not in (None, "correlation"):
                raise InputError(f"{os.fspath(path)!r} holds a {prov.get('artefact')!r}, not a correlation result")
            kw = {n: f[n][()] for n in cls._ARRAYS if n in f}
            models = f.get("models", {})
            mean = {k: models[k]["mean"][()] for k in models}
            var = {k: models[k]["var"][()] for k in models}
            dead = {k: models[k]["dead"][()].astype(bool) for k in models}
            return cls(reference=ModelLayout(**from_json(f.attrs["reference"])),
                       others=tuple(ModelLayout(**d) for d in from_json(f.attrs["others"])),
                       mean=mean, var=var, dead=dead, n_tokens=int(f.attrs["n_tokens"]),
                       config=CorrelationConfig.from_dict(from_json(f.attrs["config"])),
                       provenance=prov, **kw)
