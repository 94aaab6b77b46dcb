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
    n_controls = 99  # the ablation stage's default: p can reach 0.01
    for layer in [-1, *sorted(table["layer"].unique())]:  # -1: "all layers", as universal_neurons.ablation names it
        in_group = np.ones(n, bool) if layer == -1 else table["layer"].to_numpy() == layer
        k, name = int(max(1, uni[in_group].sum())), "all layers" if layer == -1 else f"layer {layer}"
        rows = []
        for set_, draws, scale in (("universal", 1, 0.05), ("control", n_controls, 0.01)):
            for draw in range(draws):
                dce = scale * (1 + 0.3 * rng.normal())
                rows.append({"group": name, "layer": layer, "set": set_, "draw": draw, "n_neurons": k,
                             "ce_clean": 4.0, "ce_ablated": 4.0 + dce, "delta_ce": dce, "kl": dce * 1.1,
                             "delta_entropy": 0.01 * rng.normal(), "n_tokens": 2048})
        runs += rows
        frame = pd.DataFrame(rows)
        universal, control = frame[frame.set == "universal"], frame[frame.set == "control"]
        delta, control_mean = float(universal.delta_ce.iloc[0]), float(control.delta_ce.mean())
        paired = delta - control_mean
        summ.append({"group": name, "layer": layer, "n_neurons": k, "delta_ce": delta, "delta_ce_lo": delta * 0.8,
                     "delta_ce_hi": delta * 1.2, "kl": delta * 1.1, "kl_lo": delta * 0.9, "kl_hi": delta * 1.3,
                     "delta_entropy": 0.0,
                     "control_delta_ce_mean": control_mean, "control_delta_ce_lo": float(control.delta_ce.min()),
                     "control_delta_ce_hi": float(control.delta_ce.max()), "control_kl_mean": float(control.kl.mean()),
                     "ratio_delta_ce": delta / control_mean,
                     "p_value": (1 + int((control.delta_ce >= delta).sum())) / (1 + n_controls),
                     "p_value_min": 1 / (1 + n_controls), "paired_delta_ce": paired,
                     "paired_delta_ce_lo": paired * 0.7, "paired_delta_ce_hi": paired * 1.3,
                     "delta_ce_per_neuron": delta / k, "control_delta_ce_per_neuron": control_mean / k,
                     "paired_delta_ce_per_neuron": paired / k})
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
    synthetic_agreement(table, steps, seed=seed).save(run_dir / "agreement", overwrite=True)


def synthetic_agreement(table: pd.DataFrame, steps=(0, 10, 100, 1000), *, rows: int = 32, seed: int = 0):
    """An `AgreementResult` made by the agreement stage's own `summarise` (bootstrap intervals
    included) from planted per-row sums: top-1 agreement grows from 0.25 at initialisation to
    0.7, the Jensen-Shannon divergence from 0.01 to 0.08 nats."""
    from universal_neurons.agreement import AgreementConfig, AgreementResult
    from universal_neurons.agreement.result import summarise
    from universal_neurons.figures import other_labels

    rng = np.random.default_rng(seed)
    config = AgreementConfig(n_bootstrap=200)
    counts = np.full(rows, 60.0)  # counted predictions per row
    entries, values = [], {m: [] for m in ("kl_am", "kl_ma", "js", "top1")}
    for i, step in enumerate(steps):
        t = i / max(len(steps) - 1, 1)
        for m in other_labels(table):
            entries.append({"step": step, "at_init": step == 0, "a": "a", "m": m})
            top1 = np.clip(0.25 + 0.45 * t + rng.normal(0, 0.05, rows), 0, 1)
            js = np.abs(0.01 + 0.07 * t + rng.normal(0, 0.004, rows))
            values["top1"].append(counts * top1)
            values["js"].append(counts * js)
            values["kl_am"].append(counts * js * 2.1)
            values["kl_ma"].append(counts * js * 1.9)
    arrays = {m: np.asarray(v) for m, v in values.items()}
    by_pair, by_step = summarise(entries, counts, arrays, config)
    prov = {"config": config.to_dict(), "steps": list(steps), "labels": ["a", *other_labels(table)],
            "pairs": [[e["a"], e["m"]] for e in entries if e["step"] == steps[0]],
            "token_set": {"hash": "synthetic", "n_rows": rows, "which": "held-out (tokens_held_out.h5 of the run)"}}
    return AgreementResult(table=by_pair, by_step=by_step, rows={"n": counts, **arrays}, provenance=prov)


# ---------------------------------------------------------------------------- synthetic explanations

FAMILIES = ("unigram", "alphabet", "previous_token", "position", "other")


def synthetic_universality(n_layers: int = 4, d_mlp: int = 1024, n_universal: int = 2000, *,
                           labels=("a", "b", "c", "d", "e"), seed: int = 0) -> pd.DataFrame:
    """A universality table with `n_universal` universal neurons (the highest excess first)."""
    rng = np.random.default_rng(seed)
    n = n_layers * d_mlp
    table = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), d_mlp),
                          "neuron": np.tile(np.arange(d_mlp), n_layers)})
    excess = np.sort(rng.uniform(0, 0.9, n))[::-1].copy()
    excess[:n_universal] = np.linspace(0.95, 0.51, n_universal)
    table["excess_corr"] = rng.permutation(excess)
    table["mean_baseline"] = rng.uniform(0.1, 0.3, n)
    table["mean_corr"] = table["mean_baseline"] + table["excess_corr"]
    for lab in labels[1:]:
        table[f"max_corr_{lab}"] = np.clip(table["mean_corr"] + rng.normal(0, 0.02, n), -1, 1)
        table[f"baseline_{lab}"] = table["mean_baseline"]
        table[f"partner_layer_{lab}"] = table["layer"]
        table[f"partner_neuron_{lab}"] = rng.permutation(d_mlp)[table["neuron"].to_numpy()]
    table["is_universal"] = table["excess_corr"] > 0.5
    table["dead"] = False
    table.attrs["threshold"] = 0.5
    return table


def synthetic_explanations(table: pd.DataFrame, *, labels=("a", "b", "c", "d", "e"), k: int = 20,
                           quantiles=(0.5, 0.9, 0.99), quantile_examples: int = 3, before: int = 24, after: int = 4,
                           vocab: int = 4096, seed: int = 0):
    """The explanations of every universal neuron of `table` with its partners, with the files'
    columns (docs/explanations.md): every unit a family and best features, the reference's top
    and quantile contexts with every seed's activation, output tokens. Sizes are the defaults of
    `ExplainConfig`, so a report built from them is as large as a real one."""
    from universal_neurons.explain import ExplanationData

    rng = np.random.default_rng(seed)
    texts = ["<|endoftext|>", *[f" w{i}" if i % 3 else f"W{i}" for i in range(1, vocab - 1)], "\n"]
    uni = table[table["is_universal"].astype(bool)].sort_values(["layer", "neuron"])
    groups, neurons, best, examples, output, ctx_ids, ctx_acts = [], [], [], [], [], [], []
    qcols = [f"q{q:g}" for q in quantiles]
    for g, row in enumerate(uni.itertuples()):
        members = [(labels[0], int(row.layer), int(row.neuron))]
        members += [(lab, int(getattr(row, f"partner_layer_{lab}")), int(getattr(row, f"partner_neuron_{lab}")))
                    for lab in labels[1:]]
        corr = {lab: float(getattr(row, f"max_corr_{lab}")) for lab in labels[1:]}
        groups.append({"layer": int(row.layer), "neuron": int(row.neuron), "role": "universal",
                       "members": [f"{lab}:{layer}.{n}" for lab, layer, n in members], "max_corr": corr,
                       "excess_corr": float(row.excess_corr)})
        family = FAMILIES[g % len(FAMILIES)]
        for m, (lab, layer, n) in enumerate(members):
            unit = len(neurons)
            top = float(rng.uniform(1, 4))
            neurons.append({"unit": unit, "label": lab, "layer": layer, "neuron": n, "group": g,
                            "reference_layer": int(row.layer), "reference_neuron": int(row.neuron), "role": "universal",
                            "is_reference": m == 0, "corr_with_reference": 1.0 if m == 0 else corr[lab],
                            "excess_corr": float(row.excess_corr), "n_tokens": 65536, "mean": 0.1, "var": 0.2,
                            "max_activation": top, **{c: top * q / 2 for c, q in zip(qcols, quantiles)},
                            "eta2_current_token": 0.6, "eta2_previous_token": 0.2, "eta2_position": 0.01,
                            "score_unigram": 0.55, "score_alphabet": 0.1, "score_previous_token": 0.1,
                            "score_position": 0.01, "family": family, "family_score": 0.55,
                            "best_feature": f"cur:id:{g % vocab}", "best_feature_name": f"token {texts[g % vocab]!r}",
                            "best_vr": 0.55})
            for r in range(5):
                best.append({"unit": unit, "label": lab, "layer": layer, "neuron": n, "rank": r, "feature": r,
                             "key": f"cur:id:{r}", "name": f"token {texts[(g + r) % vocab]!r}", "kind": "unigram",
                             "side": "current", "vr": 0.55 / (r + 1)})
            for d, sign in (("promoted", 1), ("suppressed", -1)):
                for r, t in enumerate(rng.integers(1, vocab, 10)):
                    output.append({"unit": unit, "label": lab, "layer": layer, "neuron": n, "direction": d, "rank": r,
                                   "token_id": int(t), "token": f'"{texts[t]}"', "cos": sign * 0.3 / (r + 1)})
            if m:
                continue  # the view shows the reference's contexts, with every seed's activation on them
            kinds = [("top", k)] + [(c, quantile_examples) for c in qcols]
            for kind, count in kinds:
                for r in range(count):
                    token = int(rng.integers(0, 65536))
                    examples.append({"example": len(examples), "unit": unit, "label": lab, "layer": layer, "neuron": n,
                                     "kind": kind, "rank": r, "token": token, "row": token // 256, "pos": token % 256,
                                     "value": top * (1 - r / 40)})
                    ids = rng.integers(1, vocab, before + 1 + after)
                    ids[: int(rng.integers(0, 4))] = -1  # a context clipped at the start of its row
                    acts = np.maximum(rng.normal(0, 0.6, (len(labels), before + 1 + after)), 0) * top
                    acts[:, before] = top * (1 - r / 40) * rng.uniform(0.6, 1, len(labels))
                    acts[:, ids < 0] = np.nan
                    ctx_ids.append(ids)
                    ctx_acts.append(acts)
    prov = {"config": {"context_before": before, "context_after": after, "k": k}, "groups": groups,
            "labels": list(labels)}
    return ExplanationData(neurons=pd.DataFrame(neurons), features=pd.DataFrame(), best_features=pd.DataFrame(best),
                           examples=pd.DataFrame(examples), output_tokens=pd.DataFrame(output),
                           context_ids=np.asarray(ctx_ids, np.int32), context_acts=np.asarray(ctx_acts, np.float32),
                           texts=texts, labels=list(labels), vr=np.zeros((len(neurons), 0)), provenance=prov)
