"""One neuron group, explained, as a person reads it: `NeuronExplanation` has a plain-text
`__str__` (contexts with the example token marked `[[token]]`) and a self-contained
`_repr_html_` (tokens coloured by each seed's activation, side by side).

The HTML is the one renderer of an explanation: notebooks show it, `html()` saves it as a
page, and the report's Neurons section embeds one fragment per card. It is kept compact (colour
by a class per tenth of the scale, each token's every-seed tooltip on the reference's row only)
so that a report with thousands of cards stays small.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

import numpy as np
import pandas as pd

from universal_neurons.errors import InputError

from .storage import ExplanationData

__all__ = ["NeuronExplanation", "HTML_STYLE", "COLOUR_LEVELS"]

COLOUR_LEVELS = 10  # a token's colour: |activation| / the seed's maximum, in tenths (finer is not visible)
_POSITIVE, _NEGATIVE = "255,120,0", "40,110,255"  # orange above zero, blue below

HTML_STYLE = """
.unx{font-family:system-ui,sans-serif;font-size:13px;line-height:1.5;max-width:1100px}
.unx h3{margin:.3em 0;font-size:15px}.unx h4{margin:.8em 0 .2em;font-size:13px}
.unx table{border-collapse:collapse;margin:.3em 0}.unx td,.unx th{padding:1px 8px;text-align:left;vertical-align:top}
.unx th{border-bottom:1px solid #ccc}.unx .num{text-align:right;font-variant-numeric:tabular-nums}
.unx .ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;margin:0}
.unx .ctx td{padding:0 4px}.unx .ctx span,.unx .tok{border-radius:2px}.unx .focus{outline:1.5px solid #222}
.unx .lab{color:#555;font-size:11px;white-space:nowrap}.unx .sep td{border-top:1px solid #eee}
.unx .fam{display:inline-block;padding:0 5px;border-radius:3px;background:#eef;font-size:11px}
.unx .feat{white-space:nowrap}
""" + "".join(f".unx .o{k}{{background:rgba({_POSITIVE},{k / COLOUR_LEVELS:.1f})}}"
              f".unx .b{k}{{background:rgba({_NEGATIVE},{k / COLOUR_LEVELS:.1f})}}"
              for k in range(1, COLOUR_LEVELS + 1)) + "\n"


def _token_text(texts: list[str], t: int) -> str:
    return texts[t] if 0 <= t < len(texts) else f"<{t}>"


def _shown(s: str) -> str:
    """A token's text on one line: newlines and tabs made visible."""
    return s.replace("\n", "\u23ce").replace("\t", "\u21e5")


def _ratio(v: float, scale: float) -> float:
    """The activation over the seed's scale, in [-1, 1] (NaN when undefined)."""
    if not np.isfinite(v) or scale <= 0:
        return float("nan")
    return float(np.clip(v / scale, -1.0, 1.0))


def _colour(v: float, scale: float) -> str:
    a = _ratio(v, scale)
    if not np.isfinite(a):
        return "transparent"
    return f"rgba({_POSITIVE},{a:.2f})" if a >= 0 else f"rgba({_NEGATIVE},{-a:.2f})"


def _colour_classes(values: np.ndarray, scale: float) -> list[str]:
    """Per token `o<k>` / `b<k>`: k tenths of the scale above / below zero; "" when it rounds to none."""
    levels = np.rint(np.clip(np.nan_to_num(values / scale, nan=0.0), -1, 1) * COLOUR_LEVELS).astype(int)
    return ["" if k == 0 else f"o{k}" if k > 0 else f"b{-k}" for k in levels.tolist()]


def _text(s: str) -> str:
    """Escaped for an element's text (quotes stay as they are: only attributes need them escaped)."""
    return html.escape(s, quote=False)


class _Lookup:
    """Each unit's rows of the explanation tables, found once for the whole data: a report
    renders thousands of views of one `ExplanationData`, and a table scan per view would cost
    minutes."""

    def __init__(self, data: ExplanationData) -> None:
        n = data.neurons
        self.row = {(str(lab), int(layer), int(neuron)): i
                    for i, (lab, layer, neuron) in enumerate(zip(n["label"], n["layer"], n["neuron"]))}
        b = data.best_features.sort_values(["unit", "rank"], kind="stable")
        self.best: dict[int, list[tuple[str, float]]] = {}
        for unit, name, vr in zip(b["unit"], b["name"], b["vr"]):
            self.best.setdefault(int(unit), []).append((str(name), float(vr)))
        self.tokens: dict[tuple[int, str], list[tuple[str, float]]] = {}
        o = data.output_tokens
        if not o.empty:
            o = o.sort_values(["unit", "direction", "rank"], kind="stable")
            for unit, d, t, c in zip(o["unit"], o["direction"], o["token_id"], o["cos"]):
                self.tokens.setdefault((int(unit), str(d)), []).append((_token_text(data.texts, int(t)), float(c)))
        e = data.examples
        groups = e.groupby(["unit", "kind"]).indices if not e.empty else {}  # positions of each (unit, kind)
        self.examples = {(int(u), str(k)): np.asarray(ix) for (u, k), ix in groups.items()}
        self.kinds = [k for k in dict.fromkeys(e["kind"]) if k != "top"] if not e.empty else []


class NeuronExplanation:
    """A reference neuron and its partners: best features, output tokens, contexts side by side.

    Args:
        data: the explanations (`load_explanations`, `explanation_data`).
        group: the index of the group (a row of `data.provenance['groups']`).
        n_contexts: top contexts shown (default: all stored).
        quantile_examples: contexts shown per activation quantile (default: all stored; 0: none).
    """

    def __init__(self, data: ExplanationData, group: int, *, n_contexts: int | None = None,
                 quantile_examples: int | None = None) -> None:
        self._setup(data, group, n_contexts, quantile_examples, _Lookup(data))

    def _setup(self, data: ExplanationData, group: int, n_contexts: int | None, quantile_examples: int | None,
               lookup: _Lookup) -> None:
        groups = data.provenance.get("groups", [])
        if not 0 <= group < len(groups):
            raise InputError(f"no group {group}; the explanations hold {len(groups)}")
        self.data, self.group, self.info = data, group, groups[group]
        self.n_contexts, self.quantile_examples = n_contexts, quantile_examples
        self._lookup = lookup
        self.members: list[pd.Series] = []
        for name in self.info["members"]:
            label, rest = name.split(":")
            layer, neuron = (int(x) for x in rest.split("."))
            i = lookup.row.get((label, layer, neuron))
            if i is not None:
                self.members.append(data.neurons.iloc[i])
        if not self.members:
            raise InputError(f"group {group} ({self.info['members'][0]}) has none of its neurons in the explanations")
        self.reference = self.members[0]

    @classmethod
    def many(cls, data: ExplanationData, groups: Sequence[int] | None = None, *, n_contexts: int | None = None,
             quantile_examples: int | None = None) -> list["NeuronExplanation"]:
        """The views of many groups of one `data`, its tables indexed once.

        Args:
            data: the explanations.
            groups: the groups' indices (default: every group).
            n_contexts, quantile_examples: as in the constructor.

        Returns:
            One view per group, in the order given.
        """
        lookup = _Lookup(data)
        if groups is None:
            groups = range(len(data.provenance.get("groups", [])))
        views = []
        for g in groups:
            view = cls.__new__(cls)
            view._setup(data, int(g), n_contexts, quantile_examples, lookup)
            views.append(view)
        return views

    # ------------------------------------------------------------------ data

    def best_features(self, unit: int) -> list[tuple[str, float]]:
        """`(feature name, VR)` of a unit's best features, best first."""
        return list(self._lookup.best.get(int(unit), []))

    def tokens(self, unit: int, direction: str) -> list[tuple[str, float]]:
        """`(token text, cos)` the unit's output promotes / suppresses, strongest first."""
        return list(self._lookup.tokens.get((int(unit), direction), []))

    def contexts(self, unit: int, kind: str = "top") -> pd.DataFrame:
        """The unit's examples of one kind ('top', 'q0.5', ...), by rank, as many as this view shows."""
        ix = self._lookup.examples.get((int(unit), kind), np.empty(0, int))
        rows = self.data.examples.iloc[ix].sort_values("rank")
        limit = self.n_contexts if kind == "top" else self.quantile_examples
        return rows.head(limit) if limit is not None else rows

    def _window(self, example: int) -> tuple[list[str], int]:
        ids = self.data.context_ids[example]
        keep = np.flatnonzero(ids >= 0)
        return [_token_text(self.data.texts, int(ids[i])) for i in keep], int(self.data.focus - keep[0])

    def _acts(self, example: int) -> np.ndarray:
        ids = self.data.context_ids[example]
        return self.data.context_acts[example][:, ids >= 0]

    def _kinds(self) -> list[str]:
        return [] if self.quantile_examples == 0 else list(self._lookup.kinds)

    # ------------------------------------------------------------------ text

    def _member_line(self, r: pd.Series) -> str:
        feats = "; ".join(f"{name} {vr:.2f}" for name, vr in self.best_features(int(r.unit))[:3])
        corr = "ref " if bool(r.is_reference) else f"{float(r.corr_with_reference):.2f}"
        return (f"  {r.label:<3} {int(r.layer)}.{int(r.neuron):<6} corr {corr:<5} {r.family:<15} "
                f"max {float(r.max_activation):7.3f}   {feats}")

    def __str__(self) -> str:
        ref, labels = self.reference, self.data.labels
        ex = float(self.info.get("excess_corr", np.nan))
        head = (f"neuron {ref.label}:{int(ref.layer)}.{int(ref.neuron)} ({self.info['role']}, excess_corr {ex:.3f}); "
                f"family {ref.family} (score {float(ref.family_score):.2f}); {int(ref.n_tokens):,} tokens")
        lines = [head, "seeds (best features: variance reduction):"]
        lines += [self._member_line(r) for r in self.members]
        for r in self.members:
            up, down = self.tokens(int(r.unit), "promoted"), self.tokens(int(r.unit), "suppressed")
            if up:
                lines.append(f"  {r.label} output promotes " + ", ".join(f"{t!r} {c:.2f}" for t, c in up[:5])
                             + "; suppresses " + ", ".join(f"{t!r} {c:.2f}" for t, c in down[:5]))
        shown = [lab for lab in labels if any(m.label == lab for m in self.members)]
        cols = [labels.index(lab) for lab in shown]
        lines.append(f"top contexts of {ref.label} (activation of {' | '.join(shown)} on the marked token):")
        for r in self.contexts(int(ref.unit)).itertuples():
            lines.append(self._text_context(int(r.example), int(r.rank) + 1, cols))
        for kind in self._kinds():
            lines.append(f"at quantile {kind[1:]} of {ref.label} (value {self._quantile(ref, kind):.3f}):")
            for r in self.contexts(int(ref.unit), kind).itertuples():
                lines.append(self._text_context(int(r.example), int(r.rank) + 1, cols))
        return "\n".join(lines)

    def _quantile(self, r: pd.Series, kind: str) -> float:
        return float(r.get(kind, np.nan))

    def _text_context(self, example: int, n: int, cols: list[int]) -> str:
        toks, focus = self._window(example)
        acts = self._acts(example)
        vals = " | ".join(f"{acts[c, focus]:6.2f}" for c in cols)
        text = "".join(f"[[{_shown(t)}]]" if i == focus else _shown(t) for i, t in enumerate(toks))
        return f"  {n:>2}. {vals}   {text}"

    def __repr__(self) -> str:
        r = self.reference
        return f"<NeuronExplanation {r.label}:{int(r.layer)}.{int(r.neuron)} ({r.family}), {len(self.members)} seeds>"

    # ------------------------------------------------------------------ HTML

    def _scale(self, label: str) -> float:
        r = next((m for m in self.members if m.label == label), None)
        v = float(r.max_activation) if r is not None else np.nan
        return v if np.isfinite(v) and v > 0 else 1.0

    def _html_context(self, example: int, rank: str) -> str:
        """One context, a row per seed: its tokens coloured by that seed's activation; the
        reference's row carries every seed's value on each token's tooltip."""
        toks, focus = self._window(example)
        acts = self._acts(example)
        labels = self.data.labels
        texts = [_text(_shown(t)) for t in toks]
        seeds = [k for k in range(len(labels)) if np.isfinite(acts[k]).any()]
        tips = [' title="' + html.escape(" | ".join(f"{labels[k]} {acts[k, i]:.3g}" for k in seeds
                                                    if np.isfinite(acts[k, i]))) + '"' for i in range(len(texts))]
        rows: list[str] = []
        for m in seeds:
            lab = labels[m]
            scale = self._scale(lab)
            first = not rows
            classes = _colour_classes(acts[m], scale)
            spans = []
            for i, text in enumerate(texts):
                tip = tips[i] if first else ""
                if i == focus:
                    spans.append(f'<span class="tok focus" style="background:{_colour(float(acts[m, i]), scale)}"'
                                 f"{tip}>{text}</span>")
                elif classes[i] or tip:
                    spans.append(f"<span{' class=' + classes[i] if classes[i] else ''}{tip}>{text}</span>")
                else:
                    spans.append(text)
            rows.append(f'<tr{" class=sep" if first else ""}><td class="lab">{rank if first else ""}</td>'
                        f'<td class="lab">{html.escape(lab)} {acts[m, focus]:.2f}</td>'
                        f'<td class="ctx">{"".join(spans)}</td></tr>')
        return "".join(rows)

    def _html_members(self) -> str:
        head = ("<tr><th>seed</th><th>neuron</th><th>corr</th><th>family</th><th>max</th><th>best features (VR)</th>"
                "<th>promotes</th><th>suppresses</th></tr>")
        body = []
        for r in self.members:
            feats = "<br>".join(f"{_text(n)} <b>{v:.2f}</b>" for n, v in self.best_features(int(r.unit)))
            up = ", ".join(_text(repr(t)) for t, _ in self.tokens(int(r.unit), "promoted")[:6])
            down = ", ".join(_text(repr(t)) for t, _ in self.tokens(int(r.unit), "suppressed")[:6])
            corr = "ref" if bool(r.is_reference) else f"{float(r.corr_with_reference):.2f}"
            body.append(f"<tr><td>{html.escape(str(r.label))}</td><td>{int(r.layer)}.{int(r.neuron)}</td>"
                        f'<td class="num">{corr}</td><td><span class="fam">{html.escape(str(r.family))}</span> '
                        f'{float(r.family_score):.2f}</td><td class="num">{float(r.max_activation):.3f}</td>'
                        f'<td class="feat">{feats}</td><td>{up}</td><td>{down}</td></tr>')
        return f"<table>{head}{''.join(body)}</table>"

    def html_fragment(self) -> str:
        """The explanation as one `<div class="unx">` (the stylesheet is `HTML_STYLE`)."""
        ref = self.reference
        ex = float(self.info.get("excess_corr", np.nan))
        parts = [f"<h3>neuron {html.escape(str(ref.label))}:{int(ref.layer)}.{int(ref.neuron)} "
                 f"<span class=fam>{html.escape(str(ref.family))}</span></h3>",
                 f"<div>{html.escape(self.info['role'])}, excess correlation {ex:.3f}, "
                 f"{int(ref.n_tokens):,} counted tokens</div>", self._html_members(),
                 f"<h4>top contexts of {html.escape(str(ref.label))}, each seed's activation "
                 "(colour: activation / that seed's maximum; hover a token of the first row for every seed's "
                 "value)</h4>",
                 "<table>" + "".join(self._html_context(int(r.example), f"{int(r.rank) + 1}.")
                                     for r in self.contexts(int(ref.unit)).itertuples()) + "</table>"]
        for kind in self._kinds():
            parts.append(f"<h4>at quantile {html.escape(kind[1:])} (value {self._quantile(ref, kind):.3f})</h4><table>"
                         + "".join(self._html_context(int(r.example), f"{int(r.rank) + 1}.")
                                   for r in self.contexts(int(ref.unit), kind).itertuples()) + "</table>")
        return f'<div class="unx">{"".join(parts)}</div>'

    def _repr_html_(self) -> str:
        return f"<style>{HTML_STYLE}</style>{self.html_fragment()}"

    def html(self) -> str:
        """A whole self-contained HTML page (no external assets)."""
        r = self.reference
        title = html.escape(f"neuron {r.label}:{int(r.layer)}.{int(r.neuron)}")
        return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{HTML_STYLE}</style>'
                f"</head><body>{self.html_fragment()}</body></html>")

    def to_dict(self) -> dict[str, Any]:
        """The members' rows as plain dicts (for tests and tools)."""
        return {"group": self.info, "members": [m.to_dict() for m in self.members]}
