"""Later-stage outputs for report tests on a real tiny pipeline run: property comparison and
persistence tables made with the real APIs (`compare_universal`, `persistence_from_tables`)
from synthetic inputs, and ablation CSVs written with the ablation stage's column names, so
every section of the report renders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from universal_neurons.figures import PROPERTY_COLUMNS
from universal_neurons.persistence import persistence_from_tables
from universal_neurons.properties import classify_families, compare_universal, save_properties


def write_synthetic_stages(run_dir: Path, table: pd.DataFrame, *, seed: int = 0, steps=(0, 10, 100, 1000)) -> None:
    rng = np.random.default_rng(seed)
    n = len(table)
    uni = table["is_universal"].to_numpy(bool)

    props = table[["layer", "neuron"]].copy()
    for p in PROPERTY_COLUMNS:
        props[p] = rng.normal(size=n) + 0.8 * uni  # universal neurons shifted, as the paper finds
    props["activation_frequency"] = rng.uniform(0, 1, n) * np.where(uni, 0.5, 1.0)
    props["vocab_kurt"] = rng.gamma(2.0, 6.0, n)
    props = classify_families(props)
    save_properties(props, run_dir / "properties.csv", overwrite=True)
    save_properties(compare_universal(table, props), run_dir / "property_comparison.csv", overwrite=True)

    runs, summ = [], []
    for layer in [-1, *sorted(table["layer"].unique())]:  # -1: "all layers", as universal_neurons.ablation names it
        in_group = np.ones(n, bool) if layer == -1 else table["layer"].to_numpy() == layer
        k, name = int(max(1, uni[in_group].sum())), "all layers" if layer == -1 else f"layer {layer}"
        rows = []
        for set_, draws, scale in (("universal", 1, 0.05), ("control", 5, 0.01)):
            for draw in range(draws):
                dce = scale * (1 + 0.3 * rng.normal())
                rows.append({"group": name, "layer": layer, "set": set_, "draw": draw, "n_neurons": k,
                             "ce_clean": 4.0, "ce_ablated": 4.0 + dce, "delta_ce": dce, "kl": dce * 1.1,
                             "delta_entropy": 0.01 * rng.normal(), "n_tokens": 2048})
        runs += rows
        frame = pd.DataFrame(rows)
        universal, control = frame[frame.set == "universal"], frame[frame.set == "control"]
        delta, control_mean = float(universal.delta_ce.iloc[0]), float(control.delta_ce.mean())
        summ.append({"group": name, "layer": layer, "n_neurons": k, "delta_ce": delta, "delta_ce_lo": delta * 0.8,
                     "delta_ce_hi": delta * 1.2, "kl": delta * 1.1, "kl_lo": delta * 0.9, "kl_hi": delta * 1.3,
                     "delta_entropy": 0.0,
                     "control_delta_ce_mean": control_mean, "control_delta_ce_lo": float(control.delta_ce.min()),
                     "control_delta_ce_hi": float(control.delta_ce.max()), "control_kl_mean": float(control.kl.mean()),
                     "ratio_delta_ce": delta / control_mean, "p_value": 0.01})
    (run_dir / "ablation").mkdir(exist_ok=True)  # where universal_neurons.ablation.ablation_stage writes
    pd.DataFrame(runs).to_csv(run_dir / "ablation" / "ablation_runs.csv", index=False)
    pd.DataFrame(summ).to_csv(run_dir / "ablation" / "ablation_summary.csv", index=False)

    # checkpoints: the excess correlation grows towards the final table, with noise
    tables = {}
    for i, t in enumerate(steps):
        tab = table.copy()
        frac = (i + 1) / len(steps)
        tab["excess_corr"] = frac * table["excess_corr"] + 0.02 * rng.normal(size=n)
        tab["is_universal"] = tab["excess_corr"] > table.attrs.get("threshold", 0.5)
        tables[t] = tab
    persistence_from_tables(tables).save(run_dir / "persistence", overwrite=True)
