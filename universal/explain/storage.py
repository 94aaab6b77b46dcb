"""The explanations' files in a run directory (docs/explanations.md gives every column):

    explanations/neurons.csv         one row per explained neuron: group, statistics, family, best feature
    explanations/features.csv        the feature definitions, with counts and shares
    explanations/best_features.csv   each neuron's best features and their variance reduction
    explanations/examples.csv        top-activating and quantile examples (token, row, position, value)
    explanations/output_tokens.csv   top promoted and suppressed tokens (empty without the models' weights)
    explanations/explanations.h5     variance reductions [unit, feature], the examples' context windows
                                     (ids, every model's activation), the decoded vocabulary (JSON); provenance
    explanations/explanations.json   provenance (token set hash, stores, settings, features) and the file list

Every file is written atomically; existing ones are refused, before any work, unless `overwrite`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from universal_neurons.artifacts import atomic_path, read_json, reading, refuse_existing, write_json
from universal_neurons.errors import InputNotFoundError
from universal_neurons.runtime import SCHEMA_VERSION, from_json, to_json

from .result import Explanations

__all__ = ["EXPLANATIONS_DIR", "FILES", "ExplanationData", "explanation_paths", "save_explanations",
           "load_explanations", "explanation_data"]

EXPLANATIONS_DIR = "explanations"
FILES = {"neurons": "neurons.csv", "features": "features.csv", "best_features": "best_features.csv",
         "examples": "examples.csv", "output_tokens": "output_tokens.csv", "arrays": "explanations.h5",
         "provenance": "explanations.json"}
_KIND = "explanations"


@dataclass
class ExplanationData:
    """The explanations as tables and arrays, from memory (`explanation_data`) or from files
    (`load_explanations`); what the views and the report read.

    Attributes:
        neurons, features, best_features, examples, output_tokens: the tables of the files.
        context_ids: `Int[ndarray, "example window"]` token ids (-1 outside the row).
        context_acts: `Float[ndarray, "example model window"]` activations of the example's
            neuron's counterpart in each model of `labels` (NaN: none, or outside the row).
        texts: `[vocab]` decoded text of each id.
        labels: the family's models, reference first.
        vr: `Float[ndarray, "unit feature"]` variance reductions.
        provenance: as in `explanations.json`.
    """

    neurons: pd.DataFrame
    features: pd.DataFrame
    best_features: pd.DataFrame
    examples: pd.DataFrame
    output_tokens: pd.DataFrame
    context_ids: np.ndarray
    context_acts: np.ndarray
    texts: list[str]
    labels: list[str]
    vr: np.ndarray
    provenance: dict[str, Any]

    @property
    def focus(self) -> int:
        """The window index of each example's own token (`context_before`)."""
        return int(self.provenance["config"]["context_before"])


def explanation_data(ex: Explanations) -> ExplanationData:
    """The tables and arrays of an in-memory result."""
    return ExplanationData(neurons=ex.neurons(), features=ex.features_frame(), best_features=ex.best_features_frame(),
                           examples=ex.examples_frame(), output_tokens=ex.output_frame(), context_ids=ex.context_ids,
                           context_acts=ex.context_acts, texts=list(ex.texts), labels=list(ex.labels), vr=ex.vr,
                           provenance=ex.provenance())


def explanation_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Every file's path under `out_dir` (a run directory's `explanations/`)."""
    return {k: Path(out_dir) / v for k, v in FILES.items()}


def save_explanations(ex: Explanations | ExplanationData, out_dir: str | os.PathLike, *,
                      overwrite: bool = False) -> dict[str, str]:
    """Write the explanations' files into `out_dir` (see the module docstring).

    Args:
        ex: an in-memory result (or its `explanation_data`).
        out_dir: the folder, e.g. `<run_dir>/explanations` (created).
        overwrite: replace existing files.

    Returns:
        name -> path of every file written.

    Raises:
        OutputExistsError: a file exists and `overwrite` is False (nothing is written).
    """
    data = explanation_data(ex) if isinstance(ex, Explanations) else ex
    paths = explanation_paths(out_dir)
    refuse_existing(*paths.values(), overwrite=overwrite)
    prov = {**data.provenance, "files": {k: v.name for k, v in paths.items()}}
    for name in ("neurons", "features", "best_features", "examples", "output_tokens"):
        with atomic_path(paths[name], overwrite=overwrite) as tmp:
            getattr(data, name).to_csv(tmp, index=False)
    import h5py

    with atomic_path(paths["arrays"], overwrite=overwrite) as tmp, h5py.File(tmp, "w") as f:
        f.attrs.update({"kind": _KIND, "schema_version": SCHEMA_VERSION, "provenance": to_json(prov),
                        "labels": to_json(data.labels)})
        vr = f.create_dataset("variance_reduction", data=data.vr, compression="gzip")
        vr.dims[0].label, vr.dims[1].label = "unit", "feature"
        ids = f.create_dataset("context_ids", data=data.context_ids.astype(np.int32), compression="gzip")
        ids.dims[0].label, ids.dims[1].label = "example", "window"
        acts = f.create_dataset("context_acts", data=data.context_acts.astype(np.float32), compression="gzip")
        acts.dims[0].label, acts.dims[1].label, acts.dims[2].label = "example", "model", "window"
        # JSON keeps every token's text exactly (byte-level vocabularies have NUL and lone control characters)
        f.create_dataset("vocab_json", data=np.frombuffer(json.dumps(data.texts).encode(), np.uint8),
                         compression="gzip")
    write_json(paths["provenance"], prov, overwrite=overwrite)
    return {k: str(v) for k, v in paths.items()}


def _csv(path: Path) -> pd.DataFrame:
    with reading(path, "explanations table", "recompute it with `universal-neurons explain RUN --all --overwrite`"):
        try:
            return pd.read_csv(path, keep_default_na=False, na_values=[""])
        except pd.errors.EmptyDataError:
            return pd.DataFrame()


def load_explanations(out_dir: str | os.PathLike) -> ExplanationData:
    """Read the files `save_explanations` wrote.

    Raises:
        InputNotFoundError: the folder lacks a file (nothing was computed there yet).
        InputError: a file is not what it should be.
    """
    paths = explanation_paths(out_dir)
    missing = [p.name for p in paths.values() if not p.exists()]
    if missing:
        raise InputNotFoundError(f"{out_dir} has no explanations ({', '.join(missing)} missing); compute them with "
                                 "`universal-neurons explain RUN --all` or explain_run(run_dir)")
    import h5py

    fix = "recompute it with `universal-neurons explain RUN --all --overwrite`"
    with reading(paths["arrays"], "explanations file", fix), h5py.File(paths["arrays"], "r") as f:
        prov = from_json(f.attrs["provenance"])
        labels = from_json(f.attrs["labels"])
        vr = f["variance_reduction"][()]
        ctx_ids, ctx_acts = f["context_ids"][()], f["context_acts"][()]
        texts = json.loads(f["vocab_json"][()].tobytes().decode())
    tables = {k: _csv(paths[k]) for k in ("neurons", "features", "best_features", "examples", "output_tokens")}
    read_json(paths["provenance"], what="explanations provenance")  # present and readable (the h5 holds the same)
    return ExplanationData(**tables, context_ids=ctx_ids, context_acts=ctx_acts, texts=texts, labels=labels, vr=vr,
                           provenance=prov)
