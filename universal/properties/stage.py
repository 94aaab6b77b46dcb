"""The properties stage: every property of every neuron in one table, its files, and the
`run_pipeline` stage that writes them for a run's reference model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from universal_neurons.activations import ActivationStore, LoadedModel, TokenSet, hook_name, load_from_provenance
from universal_neurons.artifacts import atomic_path, read_json, refuse_existing, write_json
from universal_neurons.errors import ConfigError, IncompatibleInputsError, InputError, InputNotFoundError
from universal_neurons.runtime import provenance_base

from .activations import activation_moments
from .config import CONVENTIONS, PropertiesConfig
from .families import classify_families, compare_universal, family_cuts
from .weights import weight_properties

__all__ = ["neuron_properties", "save_properties", "load_properties", "properties_stage"]

log = logging.getLogger(__name__)


def neuron_properties(
    lm: LoadedModel,
    *,
    token_set: TokenSet | None = None,
    store: ActivationStore | str | os.PathLike | None = None,
    config: PropertiesConfig = PropertiesConfig(),
    model_provenance: dict[str, Any] | None = None,
    cluster: Any = None,
) -> pd.DataFrame:
    """Every property of every neuron of `lm` in one table (see the package docstring for columns).

    Args:
        lm: the model (weights in its loaded processing).
        token_set: activation moments live over these rows when no `store` is given.
        store: activation moments from a store holding hook_pre and hook_post (preferred when
            given); neither `store` nor `token_set`: weight columns only.
        config: family rule and cuts, batch sizes.
        model_provenance: recorded instead of `lm.provenance` (e.g. the run's, with its checkpoint).
        cluster: a Dask client or spec (`universal_neurons.distributed.connect`): the activation
            moments are computed on its workers over row shards (each worker loads `lm` from its
            provenance, or reads its part of `store`), merged exactly; None runs here.

    Returns:
        DataFrame `[layer*d_mlp rows]`, provenance in `df.attrs['provenance']`, with the moment
        `conventions` (`kurt`: raw, a Gaussian has 3) and the `families` rules in words.

    Raises:
        IncompatibleInputsError: the activations cover other neurons than `lm` has.
    """
    df = weight_properties(lm, config=config)
    moments: dict[str, Any] | None = None
    if store is not None or token_set is not None:
        act = _moments(lm, token_set, store, config, cluster)
        if len(act) != len(df) or not (act["layer"].to_numpy() == df["layer"].to_numpy()).all():
            raise IncompatibleInputsError(f"the activations cover {len(act)} neurons (layers "
                                          f"{sorted(set(act['layer']))}) but {lm.name} has {len(df)} "
                                          f"({lm.n_layers} layers x {lm.d_mlp}); cache every layer of this model")
        moments = act.attrs["moments"]
        df = pd.concat([df, act.drop(columns=["layer", "neuron"])], axis=1)
    df = classify_families(df, config)
    prov = model_provenance or lm.provenance
    df.attrs["provenance"] = {
        **provenance_base("neuron_properties"),
        "model": prov, "weight_processing": prov.get("weight_processing"), "config": config.to_dict(),
        "moments": None if moments is None else {k: v for k, v in moments.items() if k != "model"},
        "conventions": dict(CONVENTIONS),
        "families": family_cuts(config),
    }
    return df


def _moments(lm: LoadedModel, token_set: TokenSet | None, store: ActivationStore | str | os.PathLike | None,
             config: PropertiesConfig, cluster: Any) -> pd.DataFrame:
    """The activation moments of `lm`, from `store` when given, else live over `token_set`; on `cluster` if given."""
    if cluster is None:
        return activation_moments(store if store is not None else lm, token_set=token_set, batch_rows=config.batch_rows)
    # imported here: universal_neurons.distributed imports this package
    from universal_neurons.distributed import ModelSpec, moments_distributed, store_moments_distributed

    if store is not None:
        path = store.path if isinstance(store, ActivationStore) else store
        return store_moments_distributed(path, cluster=cluster, token_set=token_set, batch_rows=config.batch_rows)
    assert token_set is not None
    m = ModelSpec.from_provenance(lm.provenance)
    return moments_distributed(m.spec, token_set, cluster=cluster, checkpoint=m.checkpoint,
                               process_weights=m.process_weights, dtype=m.dtype, batch_rows=config.batch_rows)


def _sidecar(path: Path) -> Path:
    return Path(str(path) + ".json")


def save_properties(df: pd.DataFrame, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a properties (or comparison) table as CSV, its provenance in `<path>.json`, atomically.

    Args:
        df: the table; `df.attrs['provenance']` goes to the side file.
        path: the CSV file.
        overwrite: replace an existing table (and its side file).

    Returns:
        `path`.

    Raises:
        OutputExistsError: `path` exists and `overwrite` is False.
    """
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        df.to_csv(tmp, index=False)
        write_json(_sidecar(path), df.attrs.get("provenance", {}), overwrite=True)  # belongs to the table
    return path


def load_properties(path: str | os.PathLike) -> pd.DataFrame:
    """Read a table written by `save_properties`; provenance in `df.attrs['provenance']`.

    Raises:
        InputNotFoundError: no table at `path`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"no properties table at {path}; compute one with neuron_properties "
                                 "(`universal-neurons properties`)")
    df = pd.read_csv(path)
    if _sidecar(path).exists():
        df.attrs["provenance"] = read_json(_sidecar(path), what="properties provenance")
        conventions = df.attrs["provenance"].get("conventions")
        if isinstance(conventions, str) and "excess" in conventions:  # written before kurtosis became raw
            log.warning("%s holds excess kurtosis (a Gaussian has 0), not the raw kurtosis (Gaussian 3) of "
                        "current tables and of the paper; add 3 to its *_kurt columns or recompute it", path)
    return df


def _finite(x: float) -> float | None:
    """JSON-safe number: NaN (an empty group) becomes None."""
    return float(x) if np.isfinite(x) else None


def properties_stage(*, config: PropertiesConfig = PropertiesConfig(), source: str = "auto",
                     overwrite: bool = True, cluster: Any = None) -> Callable[[Any], dict[str, Any]]:
    """A `run_pipeline(extra_stages=[...])` stage: properties of the reference model `a`.

    Weights come from `a` at the run's checkpoint with the run's weight processing. Moments come
    from `out_dir/stores/a.h5` when it holds hook_pre and hook_post (`source='auto'` or
    `'store'`; a float16 store gives float16-rounded moments, recorded in the provenance), else
    from the live model over the run's token set (`'live'`).

    Writes `out_dir/properties.csv` (+ `.json` provenance) and `out_dir/property_comparison.csv`
    (+ `.json`).

    Args:
        config: family rule and cuts, batch sizes.
        source: 'auto', 'store' or 'live'.
        overwrite: replace the tables of an earlier run (else they are refused before any work).
        cluster: a Dask client or spec for the activation moments (row shards of the live model,
            or token ranges of the store); None: the run's own cluster (`PipelineResult.client`,
            from `PipelineConfig.cluster`), or in process when the run has none.

    Returns:
        The stage: `result -> {"properties": {n_neurons, n_tokens, moment_source, families,
        family_rules, conventions, medians, files}}`, where `families` counts the neurons of each
        family, `family_rules` is `family_cuts(config)`, `conventions` the moment conventions
        (kurtosis raw) and `medians[prop] = {universal, other, p_value, rank_biserial}`.

    Raises:
        ConfigError: an unknown `source`.
    """
    if source not in ("auto", "store", "live"):
        raise ConfigError(f"source must be 'auto', 'store' or 'live', got {source!r}")

    def stage(result) -> dict[str, Any]:
        out = Path(result.out_dir)
        props_path, comp_path = out / "properties.csv", out / "property_comparison.csv"
        refuse_existing(props_path, comp_path, overwrite=overwrite)
        run_cfg = result.summary.get("config", {})
        prov = result.model_provenance[0]
        lm = load_from_provenance(prov, device=run_cfg.get("device"),
                                  process_weights=bool(run_cfg.get("process_weights", True)))
        store_path = out / "stores" / f"{result.labels[0]}.h5"
        store = None
        if source != "live" and store_path.exists():
            with ActivationStore.open(store_path) as s:
                has_all = all(hook_name(layer, k) in s for layer in range(lm.n_layers) for k in ("pre", "post"))
            store = store_path if has_all else None
        if source == "store" and store is None:
            raise InputError(f"{store_path} is missing or lacks hook_pre; run the pipeline with "
                             "PipelineConfig(store=StoreConfig(kinds=('post', 'pre'))) or use source='live'")
        props = neuron_properties(lm, token_set=None if store is not None else result.token_set, store=store,
                                  config=config, model_provenance=prov,
                                  cluster=cluster if cluster is not None else getattr(result, "client", None))
        props.attrs["provenance"]["label"] = result.labels[0]
        comp = compare_universal(result.table, props)
        comp.attrs["provenance"] = {**provenance_base("property_comparison"), "properties": "properties.csv",
                                    "threshold": result.table.attrs.get("threshold"),
                                    "test": "scipy.stats.mannwhitneyu two-sided; rank_biserial = 2U/(n1 n2) - 1"}
        save_properties(props, props_path, overwrite=overwrite)
        save_properties(comp, comp_path, overwrite=overwrite)
        med = {r.property: {k: _finite(getattr(r, c)) for k, c in (("universal", "median_universal"),
               ("other", "median_other"), ("p_value", "p_value"), ("rank_biserial", "rank_biserial"))}
               for r in comp.itertuples()}
        moments = props.attrs["provenance"]["moments"] or {}
        return {"properties": {
            "n_neurons": int(len(props)), "n_tokens": moments.get("n_tokens"), "moment_source": moments.get("source"),
            "families": {k: int(v) for k, v in props["family"].value_counts().items()},
            "family_rules": family_cuts(config), "conventions": dict(CONVENTIONS),
            "medians": med,
            "files": {"properties": str(props_path), "comparison": str(comp_path)},
        }}

    return stage
