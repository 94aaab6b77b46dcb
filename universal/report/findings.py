"""The report's Findings: plain sentences generated from a run's numbers, each with its
uncertainty, honest about what is not significant.

One finding per question, in reading order:

    universal   how many neurons are universal and where (Wilson interval on the fraction)
    emergence   how that grew over training (checkpoints)
    properties  what universal neurons look like (largest effects, Mann-Whitney p-values)
    families    what drives their activation (the explanations' families, against contrast neurons)
    ablation    what ablating them does against random controls (paired difference, interval, p)
    agreement   how alike the seeds' outputs are (top-1 agreement and JS with intervals, vs initialisation)

Every sentence is computed from the tables the report already reads; a question whose table
is absent is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..figures import universal_by_step, wilson_interval
from .markup import escape

__all__ = ["ALPHA", "Finding", "findings", "findings_html", "format_p", "holm"]

ALPHA = 0.05  # the level a finding is called significant at


@dataclass(frozen=True)
class Finding:
    """One sentence (or two) of the Findings block.

    Attributes:
        topic: `universal`, `emergence`, `properties`, `families`, `ablation` or `agreement`.
        title: the question it answers, as a short label.
        text: the sentences, plain text.
        significant: whether its test passes `ALPHA` (None where there is no test).
    """

    topic: str
    title: str
    text: str
    significant: bool | None = None


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%"


def _num(x: float) -> str:
    """A quantity in nats to three significant digits: small effects stay distinguishable."""
    return f"{x:.3g}" if np.isfinite(x) else "undefined"


def format_p(p: float) -> str:
    """A p-value as written in a sentence: `p = 0.31`, `p = 0.01`, `p = 4.2e-05`, `p < 1e-10`."""
    if not np.isfinite(p):
        return "p undefined"
    if p < 1e-10:
        return "p < 1e-10"
    return f"p = {p:.1e}" if p < 0.001 else f"p = {p:.2g}"


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error over the tests given; NaN kept).

    Args:
        p_values: `[test]` raw p-values.

    Returns:
        `[test]` adjusted p-values, each at least its raw value, at most 1.
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _universal(table: pd.DataFrame, threshold: float, n_seeds: int) -> Finding:
    n = len(table)
    k = int(table["is_universal"].astype(bool).sum())
    lo, hi = wilson_interval(k, n)
    others = f", averaged over the {n_seeds - 1} other seeds" if n_seeds > 2 else ""
    rule = f"excess correlation over the random-rotation baseline above {threshold:.3g}{others}"
    if k == 0:
        live = table[np.isfinite(table["excess_corr"].to_numpy(dtype=float))]
        best = live.loc[live["excess_corr"].idxmax()] if len(live) else None
        top = (f" The highest excess correlation is {best['excess_corr']:.3f} (neuron {int(best['layer'])}."
               f"{int(best['neuron'])})." if best is not None else "")
        return Finding("universal", "Universal neurons",
                       f"No neuron of {n:,} is universal ({rule}); the 95% Wilson interval on the fraction is 0 to "
                       f"{_pct(hi)}.{top}")
    by_layer = table.groupby("layer")["is_universal"].agg(["sum", "size"]).sort_index()
    parts = [f"layer {layer}: {int(r['sum']):,} of {int(r['size']):,} ({_pct(r['sum'] / r['size'])})"
             for layer, r in by_layer.iterrows()]
    if len(parts) > 4:  # many layers: the three with the largest share, the rest summed
        top = by_layer.assign(f=by_layer["sum"] / by_layer["size"]).nlargest(3, "f")
        rest = int(by_layer["sum"].sum() - top["sum"].sum())
        where = ("Most are in " + ", ".join(f"layer {layer} ({int(r['sum']):,}, {_pct(r['f'])})"
                                             for layer, r in top.iterrows())
                 + f"; the other {len(by_layer) - 3} layers hold {rest:,}.")
    elif len(parts) > 1 and (by_layer["sum"] > 0).sum() == 1:
        layer = int(by_layer.index[by_layer["sum"] > 0][0])
        r = by_layer.loc[layer]
        where = (f"All are in layer {layer} ({int(r['sum']):,} of its {int(r['size']):,}, "
                 f"{_pct(r['sum'] / r['size'])}); the other layers have none.")
    else:
        where = "By layer, " + "; ".join(parts) + "."
    return Finding("universal", "Universal neurons",
                   f"{k:,} of {n:,} neurons are universal ({_pct(k / n)}; 95% Wilson interval {_pct(lo)} to "
                   f"{_pct(hi)}, treating neurons as independent draws): {rule}. {where}")


def _emergence(emergence: pd.DataFrame) -> Finding | None:
    overall = universal_by_step(emergence)
    if len(overall) < 2:
        return None
    first, last = overall.iloc[0], overall.iloc[-1]

    def at(r: pd.Series) -> str:
        interval = (f" ({_pct(r['lo'])} to {_pct(r['hi'])})" if np.isfinite(r["lo"]) else "")
        return f"{_pct(r['fraction'])} at step {int(r['step']):,}{interval}"

    counts = overall["n_universal"].to_numpy(dtype=float)
    present = overall[(counts > 0) if np.isfinite(counts).all() else (overall["fraction"] > 0)]
    text = f"The universal fraction went from {at(first)} to {at(last)}."
    peak = overall.loc[overall["fraction"].idxmax()]
    if peak["step"] != last["step"] and peak["fraction"] > last["fraction"]:
        text += f" It peaked at {at(peak)}."
    steps = ", ".join(f"{int(s):,}" for s in present["step"])
    if len(present) >= 3:
        text += f" Universal neurons are present at {len(present)} of {len(overall)} checkpoints (steps {steps})."
    elif len(present):
        text += (f" Universal neurons are present at only {len(present)} of {len(overall)} checkpoints (step"
                 f"{'s' if len(present) > 1 else ''} {steps}), too few to say much about their persistence.")
    else:
        text += " No checkpoint has a universal neuron."
    text += " Intervals are 95% Wilson intervals."
    return Finding("emergence", "Over training", text)


def _properties(comparison: pd.DataFrame, n_show: int = 3) -> Finding | None:
    need = {"property", "p_value", "rank_biserial"}
    if not need <= set(comparison.columns):
        return None
    rows = comparison[np.isfinite(comparison["p_value"].to_numpy(dtype=float))
                      & np.isfinite(comparison["rank_biserial"].to_numpy(dtype=float))].copy()
    if not len(rows):
        return None
    rows["adjusted"] = holm(rows["p_value"].to_numpy(dtype=float))
    rows = rows.reindex(rows["rank_biserial"].abs().sort_values(ascending=False).index)
    n_uni = int(rows["n_universal"].max()) if "n_universal" in rows else None

    def effect(r: Any) -> str:
        direction = "higher" if r.rank_biserial > 0 else "lower"
        medians = (f"median {r.median_universal:.3g} vs {r.median_other:.3g}, "
                   if {"median_universal", "median_other"} <= set(rows.columns) else "")
        return f"{direction} {r.property} ({medians}r = {r.rank_biserial:+.2f}, {format_p(r.p_value)})"

    significant = rows[rows["adjusted"] < ALPHA]
    m = len(rows)
    method = (f"Mann-Whitney U tests of universal against all other neurons; r is the rank-biserial correlation; "
              f"{m} properties compared")
    if len(significant):
        shown = significant.head(n_show)
        text = (f"Universal neurons have {'; '.join(effect(r) for r in shown.itertuples())}. "
                f"{len(significant)} of {m} properties differ at {ALPHA:g} after Holm's correction ({method}).")
    else:
        best = rows.iloc[0]
        text = (f"No property separates universal from other neurons at {ALPHA:g} after Holm's correction for the "
                f"{m} properties compared; the largest effect is {effect(best)}, uncorrected ({method}).")
    if n_uni is not None and n_uni < 10:
        text += f" With {n_uni} universal neuron{'s' if n_uni != 1 else ''} these tests have little power."
    return Finding("properties", "What they look like", text, significant=bool(len(significant)))


_FAMILY_WORDS = {"unigram": "unigram", "alphabet": "alphabet", "previous_token": "previous-token",
                 "position": "position", "other": "other", "dead": "dead"}


def _family_counts(refs: pd.DataFrame) -> str:
    counts = refs["family"].value_counts()
    order = [f for f in _FAMILY_WORDS if f in counts.index] + [f for f in counts.index if f not in _FAMILY_WORDS]
    return ", ".join(f"{int(counts[f]):,} {_FAMILY_WORDS.get(f, f)}" for f in order)


def _families(data: Any) -> Finding | None:
    n = data.neurons
    if n.empty or not {"is_reference", "role", "family"} <= set(n.columns):
        return None
    refs = n[n["is_reference"].astype(bool)]
    uni, contrast = refs[refs["role"] == "universal"], refs[refs["role"] == "contrast"]
    if not len(uni):
        return None
    text = (f"Judged by the share of activation variance one simple feature explains (the current or previous "
            f"token, or the position): of the {len(uni):,} universal neurons explained, {_family_counts(uni)}")
    if len(contrast):
        text += f"; of {len(contrast):,} other neurons sampled for contrast, {_family_counts(contrast)}"
    return Finding("families", "What drives them", text + ". The Neurons section shows each one.")


def _ablation(summary_table: pd.DataFrame, stage: dict) -> Finding | None:
    if "delta_ce" not in summary_table.columns:
        return None
    whole = summary_table[summary_table["group"].astype(str) == "all layers"] if "group" in summary_table else None
    r = (whole if whole is not None and len(whole) else summary_table).iloc[0]
    get = lambda c: float(r[c]) if c in r.index and pd.notna(r[c]) else math.nan  # noqa: E731
    k = int(get("n_neurons")) if np.isfinite(get("n_neurons")) else None
    kind = stage.get("kind")
    verb = f"{kind}-ablating" if kind in ("mean", "zero") else "ablating"
    who = f"the {k:,} universal neuron{'s' if k != 1 else ''}" if k else "the universal neurons"
    dce, lo, hi = get("delta_ce"), get("delta_ce_lo"), get("delta_ce_hi")
    change = "raises" if dce > 0 else "lowers"
    text = f"{verb.capitalize()} {who} together {change} the next-token loss by {_num(abs(dce))} nats"
    if np.isfinite(lo):
        text += f" (95% interval {_num(lo)} to {_num(hi)})"
    per = get("delta_ce_per_neuron")
    text += f", {_num(per)} nats per neuron." if np.isfinite(per) and k and k > 1 else "."
    p, p_min = get("p_value"), get("p_value_min")
    paired, plo, phi = get("paired_delta_ce"), get("paired_delta_ce_lo"), get("paired_delta_ce_hi")
    if not np.isfinite(paired) and np.isfinite(get("control_delta_ce_mean")):
        paired = dce - get("control_delta_ce_mean")  # older ablation files: the difference without its interval
    n_controls = round(1 / p_min - 1) if np.isfinite(p_min) and p_min > 0 else None
    against = f" against {n_controls} random sets" if n_controls else ""
    interval = f", 95% interval {_num(plo)} to {_num(phi)}" if np.isfinite(plo) else ""
    below = bool(np.isfinite(p) and p <= ALPHA)
    excludes_zero = not np.isfinite(plo) or plo > 0
    significant = below and paired > 0 and excludes_zero
    if significant:
        text += (f" That is {_num(paired)} nats more than random sets of the same size from the same layers "
                 f"(paired difference{interval}; {format_p(p)}{against}).")
    elif below:
        text += (f" It does more than random sets of the same size ({format_p(p)}{against}), but the paired "
                 f"difference's interval includes 0 ({_num(paired)} nats{interval}): weak evidence.")
    elif np.isfinite(p):
        if np.isfinite(phi) and phi < 0:
            text += (f" It does less than random sets of the same size: the paired difference is {_num(paired)} nats"
                     f"{interval}, below 0 ({format_p(p)} for the test that universal sets do more{against}).")
        else:
            text += (f" This is not distinguishable from random sets of the same size (paired difference "
                     f"{_num(paired)} nats{interval}; {format_p(p)}{against}).")
        if np.isfinite(p_min) and p_min > ALPHA:
            text += (f" With {n_controls} controls the p-value cannot go below {p_min:.2g}: no result could be "
                     f"significant at {ALPHA:g}.")
    else:
        text += f" The difference from random sets of the same size is {_num(paired)} nats (no test recorded)."
    return Finding("ablation", "Ablating them", text, significant=significant if np.isfinite(p) else None)


def _agreement(by_step: pd.DataFrame, which: str | None) -> Finding | None:
    if not len(by_step) or "top1" not in by_step.columns:
        return None
    ordered = by_step.sort_values("step", na_position="last")
    at_init = ordered["at_init"].astype(bool) if "at_init" in ordered else pd.Series(False, index=ordered.index)
    final = ordered[~at_init.to_numpy()]
    if not len(final):
        return None
    end, init = final.iloc[-1], (ordered[at_init.to_numpy()].iloc[0] if at_init.any() else None)
    step = "" if pd.isna(end["step"]) else f" at step {int(end['step']):,}"
    n_pairs = int(end["n_pairs"]) if "n_pairs" in end.index and pd.notna(end["n_pairs"]) else None
    pairs = f", mean over {n_pairs} pair{'s' if n_pairs != 1 else ''} of seeds" if n_pairs else ""
    where = f" on {which} tokens" if which else ""
    text = (f"After training{step} the seeds' next-token predictions agree on {_pct(end['top1'], 1)} of predictions"
            f"{where} (top-1 agreement{pairs}; 95% interval {_pct(end['top1_lo'], 1)} to {_pct(end['top1_hi'], 1)})")
    if init is not None:
        text += (f", against {_pct(init['top1'], 1)} ({_pct(init['top1_lo'], 1)} to {_pct(init['top1_hi'], 1)}) "
                 "at initialisation")
        apart = end["top1_lo"] > init["top1_hi"] or end["top1_hi"] < init["top1_lo"]
        text += ("; the intervals do not overlap." if apart
                 else "; the intervals overlap, so this is not distinguishable from initialisation.")
    else:
        text += "."
    if "js" in end.index and pd.notna(end["js"]):
        text += (f" Their Jensen-Shannon divergence is {end['js']:.3g} nats ({end['js_lo']:.3g} to {end['js_hi']:.3g}; "
                 "0 for identical predictions, at most ln 2 = 0.693)")
        if init is not None:
            text += (f", at initialisation {init['js']:.3g}: untrained seeds all predict near-uniform distributions, "
                     "so their divergence is small without their computing the same function.")
        else:
            text += "."
    return Finding("agreement", "How alike the seeds behave", text)


def findings(*, summary: dict, table: pd.DataFrame, property_comparison: pd.DataFrame | None = None,
             ablation_summary: pd.DataFrame | None = None, emergence: pd.DataFrame | None = None,
             agreement: Any = None, explanations: Any = None) -> list[Finding]:
    """The run's findings, one per question whose table is present.

    Args:
        summary: the run's `summary.json` (threshold, seeds, the stages' records).
        table: the universality table (`layer`, `is_universal`, `excess_corr`).
        property_comparison: `property_comparison.csv` (`property, p_value, rank_biserial`, medians).
        ablation_summary: `ablation_summary.csv` (the `all layers` row is reported).
        emergence: the universal fraction per checkpoint and layer.
        agreement: an `AgreementResult` (its `by_step` and provenance), or None.
        explanations: the explanations stage's `ExplanationData` (its neurons' families), or None.

    Returns:
        The findings, in reading order.
    """
    universality = summary.get("universality", {})
    threshold = float(universality.get("threshold", table.attrs.get("threshold", 0.5)))
    models = summary.get("inputs", {}).get("models", [])
    n_seeds = len(models) or len([c for c in table.columns if c.startswith("max_corr_")]) + 1
    out: list[Finding | None] = [_universal(table, threshold, n_seeds)]
    if emergence is not None and len(emergence):
        out.append(_emergence(emergence))
    if property_comparison is not None:
        out.append(_properties(property_comparison))
    if explanations is not None:
        out.append(_families(explanations))
    if ablation_summary is not None:
        stage = summary.get("ablation")
        out.append(_ablation(ablation_summary, stage if isinstance(stage, dict) else {}))
    if agreement is not None:
        prov = agreement.provenance or {}
        which = (prov.get("token_set") or {}).get("which")
        which = "held-out" if which and str(which).startswith("held-out") else None
        out.append(_agreement(agreement.by_step, which))
    return [f for f in out if f is not None]


def findings_html(items: list[Finding]) -> str:
    """The Findings block: one line per finding, its question first; tests that do not reach
    `ALPHA` are marked as such."""
    if not items:
        return ""
    rows = []
    for f in items:
        mark = "" if f.significant is None else (' <span class="sig">significant</span>' if f.significant
                                                 else ' <span class="ns">not significant</span>')
        rows.append(f'<li data-topic="{escape(f.topic)}"><b>{escape(f.title)}.</b> {escape(f.text)}{mark}</li>')
    return f'<section class="findings" id="findings"><h2>Findings</h2><ul>{"".join(rows)}</ul></section>'
