"""Reading a pipeline run directory: everything the report shows, each later stage's output
optional (absent outputs are None and their sections are left out; an unreadable one is
logged and left out too, so one bad file never costs the whole report)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from universal_neurons.artifacts import read_json
from universal_neurons.errors import InputNotFoundError, UniversalNeuronsError

from ..universality import load_universality_table

__all__ = ["load_run"]

log = logging.getLogger(__name__)

# what universal_neurons.persistence.PersistenceResult.save writes (named here, not imported, so
# that reading a report does not import the pipeline)
_PERSISTENCE_FILES = {"overall": "persistence_overall.csv", "per_layer": "persistence_per_layer.csv",
                      "partner_consistency": "partner_consistency.csv", "emergence": "emergence.csv"}


def _read_csv(path: Path) -> pd.DataFrame | None:
    """The table at `path`, or None when it is absent, empty or unreadable (logged)."""
    if not path.exists():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        log.warning("skipping %s: %s", path, e)
        return None
    return df if len(df) else None


def _step_of(path: Path) -> int | None:
    match = re.search(r"(\d+)$", path.name)
    return int(match.group(1)) if match else None


def _emergence_from_checkpoints(run_dir: Path) -> pd.DataFrame | None:
    """Universal fraction per layer and checkpoint, read off `checkpoints/step-<t>/summary.json`."""
    rows = []
    for step_dir in sorted((run_dir / "checkpoints").glob("step-*")):
        step, summary_path = _step_of(step_dir), step_dir / "summary.json"
        if step is None or not summary_path.exists():
            continue
        summary = read_json(summary_path, what="checkpoint run summary")
        for layer in summary.get("universality", {}).get("per_layer", []):
            rows.append({"step": step, "layer": layer["layer"], "n_universal": layer["universal"],
                         "n_neurons": layer.get("neurons", np.nan), "fraction": layer["universal_fraction"],
                         "mean_excess": layer.get("mean_max_corr", np.nan) - layer.get("mean_baseline", np.nan)})
    return pd.DataFrame(rows) if rows else None


def _stage_dir(run: Path, summary: dict, key: str, marker: str) -> Path | None:
    """The folder a later stage wrote (the one holding `marker`), or None.

    A stage records its directory as it was given (maybe relative to another working directory,
    or None when skipped): it is looked for by name inside this run directory first.
    """
    info = summary.get(key)
    recorded = Path((info.get("dir") if isinstance(info, dict) else None) or key)
    return next((p for p in (run / recorded.name, recorded, run) if (p / marker).exists()), None)


def _explanations(run: Path) -> Any:
    """The explanations stage's output (`ExplanationData`), or None."""
    folder = run / "explanations"
    if not (folder / "explanations.h5").exists():
        return None
    from universal_neurons.explain.storage import load_explanations

    try:
        return load_explanations(folder)
    except (UniversalNeuronsError, OSError, KeyError, ValueError) as err:
        log.warning("report: the neuron cards are left out, %s is unreadable: %s", folder, err)
        return None


def _agreement(run: Path, summary: dict) -> Any:
    """The agreement stage's output (`AgreementResult`), or None. Without its folder, the per-step
    means the summary records (`summary["agreement"]["by_step"]`) still give the section."""
    folder = _stage_dir(run, summary, "agreement", "agreement_by_step.csv")
    info = summary.get("agreement")
    info = info if isinstance(info, dict) else {}
    recorded = info.get("by_step")
    if folder is None and not recorded:
        return None
    from universal_neurons.agreement.result import AgreementResult, entry_columns

    if folder is None:
        log.info("report: agreement from the summary's per-step means (no agreement/ folder in %s)", run)
        by_step = pd.DataFrame(recorded)
        by_step["step"] = by_step["step"].astype("Int64")
        return AgreementResult(table=pd.DataFrame(columns=entry_columns()), by_step=by_step, rows={},
                               provenance={"token_set": info.get("tokens") or {}, "steps": info.get("steps")})
    try:
        return AgreementResult.load(folder)
    except (UniversalNeuronsError, OSError, KeyError, ValueError) as err:
        log.warning("report: agreement is left out, %s is unreadable: %s", folder, err)
        return None


def load_run(run_dir: str | os.PathLike, *, summary: dict | None = None) -> dict[str, Any]:
    """Everything a report shows, read from a run directory; absent outputs are None.

    Args:
        run_dir: the output directory of a pipeline run.
        summary: replaces `summary.json` (the pipeline's report stage passes the summary it is
            about to write).

    Returns:
        A dict with `run_dir`, `summary`, `table` (the universality table, one row per neuron),
        `properties`, `property_comparison`, `ablation_summary`, `ablation_runs`,
        `persistence` (name -> DataFrame), `emergence`, `explanations` (the explanations
        stage's `ExplanationData`) and `agreement` (the agreement stage's `AgreementResult`).

    Raises:
        InputNotFoundError: the directory has no `summary.json` or no universality table.
    """
    run = Path(run_dir)
    if summary is None:
        if not (run / "summary.json").exists():
            raise InputNotFoundError(f"{run} has no summary.json; give the output directory of a pipeline run "
                                     "(`universal-neurons run ... -o DIR` or `run_pipeline(..., out_dir)`)")
        summary = read_json(run / "summary.json", what="run summary")
    table_path = next((run / f"universality.{ext}" for ext in ("csv", "h5") if (run / f"universality.{ext}").exists()),
                      None)
    if table_path is None:
        raise InputNotFoundError(f"{run} has no universality.csv or universality.h5; run the pipeline first")
    table = load_universality_table(table_path)
    table.attrs.setdefault("threshold", summary.get("universality", {}).get("threshold", 0.5))
    # universal_neurons.ablation.ablation_stage writes into out_dir/ablation/ (subdir configurable)
    ablation_dir = _stage_dir(run, summary, "ablation", "ablation_summary.csv") or run
    persistence_dir = run / "persistence"
    persistence = {}
    if persistence_dir.is_dir():
        for key, name in _PERSISTENCE_FILES.items():
            df = _read_csv(persistence_dir / name)
            if df is not None:
                persistence[key] = df
    emergence = persistence.pop("emergence", None)
    if emergence is None:
        emergence = _emergence_from_checkpoints(run)
    return {
        "run_dir": run, "summary": summary, "table": table,
        "properties": _read_csv(run / "properties.csv"),
        "property_comparison": _read_csv(run / "property_comparison.csv"),
        "ablation_summary": _read_csv(ablation_dir / "ablation_summary.csv"),
        "ablation_runs": _read_csv(ablation_dir / "ablation_runs.csv"),
        "persistence": persistence, "emergence": emergence,
        "explanations": _explanations(run), "agreement": _agreement(run, summary),
    }
