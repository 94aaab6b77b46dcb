"""Stage: a pipeline run directory -> one self-contained HTML report (STYLE.md principle 11).

    report = Report.from_run("runs/demo")     # reads what the run left; absent stages are left out
    report                                    # renders inline in Jupyter (offline)
    report.save("runs/demo/report.html")      # one file, plotly.js embedded once, no network

What it reads (each optional but the first two):

    summary.json, universality.csv          headline numbers, provenance, the universality table
    properties.csv, property_comparison.csv neuron properties, universal vs other
    ablation/ablation_summary.csv, ablation_runs.csv   universal sets vs random controls (universal_neurons.ablation)
    persistence/persistence_*.csv, partner_consistency.csv, emergence.csv
                                            persistence across checkpoints (universal_neurons.persistence);
                                            without emergence.csv, emergence from checkpoints/step-*/

`report_stage` is the same as a pipeline stage: `run_pipeline(..., extra_stages=[..., report_stage])`
(last, since stages run in order and the report shows what the earlier ones wrote).
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from universal_neurons.errors import UniversalNeuronsError

from . import figures as F
from .universality import load_universality_table

__all__ = ["Report", "ReportSection", "load_run", "report_stage"]

log = logging.getLogger("universal_neurons")

MAX_TABLE_ROWS = 5000  # rows of the neuron table; beyond it the HTML gets slow to sort
_PLOT_CONFIG = {"displaylogo": False, "responsive": True,
                "toImageButtonOptions": {"format": "png", "scale": 2}}


@dataclass
class ReportSection:
    """One section of the report: a title, a short explanation (HTML), its figures (by name in
    `Report.figures`) and any extra HTML (tables)."""

    key: str
    title: str
    intro: str
    figures: list[str] = field(default_factory=list)
    html: str = ""


# ---------------------------------------------------------------------------- reading a run


def _csv(path: Path) -> pd.DataFrame | None:
    if not path.exists():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as e:
        log.warning("skipping %s: %s", path, e)
        return None
    return df if len(df) else None


def _step_of(p: Path) -> int | None:
    m = re.search(r"(\d+)$", p.name)
    return int(m.group(1)) if m else None


def _emergence_from_checkpoints(run_dir: Path) -> pd.DataFrame | None:
    """Universal fraction per layer and checkpoint, read off `checkpoints/step-<t>/summary.json`."""
    rows = []
    for d in sorted((run_dir / "checkpoints").glob("step-*")):
        step, sj = _step_of(d), d / "summary.json"
        if step is None or not sj.exists():
            continue
        for pl in json.loads(sj.read_text()).get("universality", {}).get("per_layer", []):
            rows.append({"step": step, "layer": pl["layer"], "n_universal": pl["universal"],
                         "fraction": pl["universal_fraction"],
                         "mean_excess": pl.get("mean_max_corr", np.nan) - pl.get("mean_baseline", np.nan)})
    return pd.DataFrame(rows) if rows else None


def load_run(run_dir: str | os.PathLike, *, summary: dict | None = None) -> dict[str, Any]:
    """Everything a report shows, read from a run directory; absent outputs are None.

    **Returns** a dict with `summary`, `table` (universality), `properties`, `property_comparison`,
    `ablation_summary`, `ablation_runs`, `persistence` (name -> DataFrame) and `emergence`.
    """
    d = Path(run_dir)
    if summary is None:
        if not (d / "summary.json").exists():
            raise UniversalNeuronsError(f"{d} has no summary.json; give the output directory of a pipeline run "
                                        "(`universal-neurons run ... -o DIR` or `run_pipeline(..., out_dir)`)")
        summary = json.loads((d / "summary.json").read_text())
    table_path = next((d / f"universality.{e}" for e in ("csv", "h5") if (d / f"universality.{e}").exists()), None)
    if table_path is None:
        raise UniversalNeuronsError(f"{d} has no universality.csv or universality.h5; run the pipeline first")
    table = load_universality_table(table_path)
    table.attrs.setdefault("threshold", summary.get("universality", {}).get("threshold", 0.5))
    # universal_neurons.ablation.ablation_stage writes into out_dir/ablation/ (subdir configurable)
    abl_info = summary.get("ablation") if isinstance(summary.get("ablation"), dict) else {}
    # the stage records its directory as it was given (maybe relative to another working
    # directory, or None when skipped): look for it by name inside this run directory
    recorded = Path(abl_info.get("dir") or "ablation")
    abl = next((p for p in (d / recorded.name, recorded, d) if (p / "ablation_summary.csv").exists()), d)
    pers_dir = d / "persistence"
    persistence = {}
    if pers_dir.is_dir():  # file names of universal_neurons.persistence.PersistenceResult.save
        for key, name in (("overall", "persistence_overall.csv"), ("per_layer", "persistence_per_layer.csv"),
                          ("partner_consistency", "partner_consistency.csv"), ("emergence", "emergence.csv")):
            df = _csv(pers_dir / name)
            if df is not None:
                persistence[key] = df
    emergence = persistence.pop("emergence", None)
    if emergence is None:
        emergence = _emergence_from_checkpoints(d)
    return {
        "run_dir": d, "summary": summary, "table": table,
        "properties": _csv(d / "properties.csv"), "property_comparison": _csv(d / "property_comparison.csv"),
        "ablation_summary": _csv(abl / "ablation_summary.csv"), "ablation_runs": _csv(abl / "ablation_runs.csv"),
        "persistence": persistence, "emergence": emergence,
    }


# ---------------------------------------------------------------------------- HTML helpers


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return "–" if not np.isfinite(v) else f"{v:.{digits}f}"
    if v is None:
        return "–"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=str)
    return str(v)


def _kv(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _sortable(df: pd.DataFrame, *, table_id: str, caption: str = "") -> str:
    """A table sorted by clicking a column header (inline script in the page, no library)."""
    head = "".join(f'<th title="click to sort">{_e(c)}</th>' for c in df.columns)
    rows = []
    for rec in df.itertuples(index=False):
        cells = []
        for v in rec:
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
            attr = f' data-v="{float(v)!r}"' if num and np.isfinite(v) else ""
            cells.append(f'<td{attr}{" class=num" if num else ""}>{_e(_fmt(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return (f'<input class="filter" type="search" placeholder="filter rows…" data-table="{table_id}">'
            f'<div class="scroll"><table class="sortable" id="{table_id}">{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _neuron_table(table: pd.DataFrame, props: pd.DataFrame | None) -> tuple[pd.DataFrame, str]:
    others = F._others(table)
    uni = table[table["is_universal"].astype(bool)]
    note = ""
    if not len(uni):
        uni = F._live(table).nlargest(25, "excess_corr")
        note = "No neuron passes the threshold; the 25 with the highest excess correlation are shown instead."
    uni = uni.sort_values("excess_corr", ascending=False)
    if len(uni) > MAX_TABLE_ROWS:
        note = f"The {MAX_TABLE_ROWS:,} universal neurons with the highest excess correlation of {len(uni):,}."
        uni = uni.head(MAX_TABLE_ROWS)
    out = pd.DataFrame({"neuron": [f"L{l}.N{n}" for l, n in zip(uni["layer"], uni["neuron"])],
                        "layer": uni["layer"].astype(int).to_numpy(), "index": uni["neuron"].astype(int).to_numpy(),
                        "excess": uni["excess_corr"].to_numpy(), "mean corr": uni["mean_corr"].to_numpy(),
                        "mean baseline": uni["mean_baseline"].to_numpy()})
    for m in others:
        pl, pn = uni[f"partner_layer_{m}"].to_numpy(), uni[f"partner_neuron_{m}"].to_numpy()
        out[f"partner in {m}"] = [f"L{int(a)}.N{int(b)}" if np.isfinite(a) and np.isfinite(b) else "–" for a, b in zip(pl, pn)]
        out[f"corr {m}"] = uni[f"max_corr_{m}"].to_numpy()
    if props is not None and "family" in props.columns:
        fam = props.set_index(["layer", "neuron"])["family"]
        out["family"] = [fam.get((int(l), int(n)), "") for l, n in zip(uni["layer"], uni["neuron"])]
    return out, note


# ---------------------------------------------------------------------------- the report


_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#e3e6ec;--bg:#f6f7f9;--accent:#d62728;--card:#fff}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
.un-header{background:linear-gradient(135deg,#1d2330,#36405a);color:#fff;padding:28px 40px 22px}
.un-header h1{margin:0 0 4px;font-size:26px;font-weight:650}
.un-header .sub{color:#c8cfdc;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:18px}
.card{background:rgba(255,255,255,.09);border:1px solid rgba(255,255,255,.15);border-radius:10px;padding:10px 16px;min-width:150px}
.card .v{font-size:22px;font-weight:650}
.card .v.accent{color:#ff8a80}
.card .k{font-size:12px;color:#c8cfdc;text-transform:uppercase;letter-spacing:.04em}
nav{position:sticky;top:0;z-index:10;background:#fff;border-bottom:1px solid var(--line);padding:8px 40px;display:flex;gap:18px;flex-wrap:wrap}
nav a{color:var(--muted);text-decoration:none;font-size:13px}
nav a:hover{color:var(--accent)}
main{max-width:1280px;margin:0 auto;padding:10px 40px 60px}
section{background:var(--card);border:1px solid var(--line);border-radius:12px;margin:22px 0;padding:8px 24px 20px}
section h2{font-size:19px;margin:14px 0 4px}
.intro{color:var(--muted);max-width:920px;margin:0 0 8px}
.intro b{color:var(--fg)}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:8px}
@media (max-width:1000px){.grid2{grid-template-columns:1fr}}
.fig{min-height:300px}
table{border-collapse:collapse;font-size:13px}
table.kv th{text-align:left;color:var(--muted);font-weight:500;padding:3px 16px 3px 0;vertical-align:top;white-space:nowrap}
table.kv td{padding:3px 0;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
table.sortable{width:100%}
table.sortable th{position:sticky;top:0;background:#eef0f4;cursor:pointer;padding:6px 10px;text-align:left;white-space:nowrap;user-select:none}
table.sortable th:after{content:" ⇅";color:#aab}
table.sortable th.asc:after{content:" ▲";color:var(--accent)}
table.sortable th.desc:after{content:" ▼";color:var(--accent)}
table.sortable td{padding:4px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
table.sortable td.num{text-align:right;font-variant-numeric:tabular-nums}
table.sortable tbody tr:hover{background:#fff6f5}
table caption{caption-side:bottom;text-align:left;color:var(--muted);padding-top:6px}
.scroll{max-height:520px;overflow:auto;border:1px solid var(--line);border-radius:8px}
.filter{margin:6px 0 8px;padding:5px 10px;border:1px solid var(--line);border-radius:6px;width:260px}
.note{color:var(--muted);font-style:italic}
details{margin-top:10px}
summary{cursor:pointer;color:var(--muted)}
pre{background:#f3f4f7;padding:12px;border-radius:8px;overflow:auto;max-height:420px;font-size:12px}
h3{font-size:15px;margin:16px 0 4px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:20px}
"""

_JS = """
(function(){
  function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent.trim().toLowerCase():parseFloat(v);}
  document.querySelectorAll('table.sortable').forEach(function(t){
    t.querySelectorAll('thead th').forEach(function(th,i){
      th.addEventListener('click',function(){
        var asc=!th.classList.contains('asc');
        t.querySelectorAll('thead th').forEach(function(h){h.classList.remove('asc','desc');});
        th.classList.add(asc?'asc':'desc');
        var tb=t.tBodies[0],rows=Array.prototype.slice.call(tb.rows);
        rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
          if(typeof x!==typeof y){x=String(x);y=String(y);}
          return (x<y?-1:x>y?1:0)*(asc?1:-1);});
        rows.forEach(function(r){tb.appendChild(r);});
      });
    });
  });
  document.querySelectorAll('input.filter').forEach(function(inp){
    inp.addEventListener('input',function(){
      var q=inp.value.toLowerCase(),t=document.getElementById(inp.getAttribute('data-table'));
      Array.prototype.forEach.call(t.tBodies[0].rows,function(r){
        r.style.display=r.textContent.toLowerCase().indexOf(q)>=0?'':'none';});
    });
  });
})();
"""


class Report:
    """The report of one pipeline run: figures (name -> plotly Figure), sections, headline
    numbers and provenance. Renders inline in Jupyter and saves to one offline HTML file.

    Build it with `Report.from_run(run_dir)`; `report.figures["excess_distribution"]` etc. are
    ordinary plotly figures to restyle or export.
    """

    def __init__(self, *, title: str, headline: list[tuple[str, str, bool]], sections: list[ReportSection],
                 figures: dict[str, go.Figure], summary: dict[str, Any], run_dir: Path | None = None):
        self.title = title
        self.headline = headline  # (label, value, accent)
        self.sections = sections
        self.figures = figures
        self.summary = summary
        self.run_dir = run_dir

    def __repr__(self) -> str:
        return (f"Report({self.title!r}, sections={[s.key for s in self.sections]}, "
                f"figures={list(self.figures)})")

    # ------------------------------------------------------------------ building

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, summary: dict | None = None, title: str | None = None) -> "Report":
        """Read a run directory (see the module docstring) and build every section whose inputs
        exist. `summary` replaces summary.json (the pipeline's report stage passes the summary
        it is about to write)."""
        run = load_run(run_dir, summary=summary)
        return cls.from_data(**run, title=title)

    @classmethod
    def from_data(cls, *, summary: dict, table: pd.DataFrame, properties: pd.DataFrame | None = None,
                  property_comparison: pd.DataFrame | None = None, ablation_summary: pd.DataFrame | None = None,
                  ablation_runs: pd.DataFrame | None = None, persistence: dict[str, pd.DataFrame] | None = None,
                  emergence: pd.DataFrame | None = None, run_dir: str | os.PathLike | None = None,
                  title: str | None = None) -> "Report":
        """The same from tables already in memory (e.g. a notebook's own results)."""
        u = summary.get("universality", {})
        thr = float(u.get("threshold", table.attrs.get("threshold", 0.5)))
        table.attrs["threshold"] = thr
        figs: dict[str, go.Figure] = {}
        sections: list[ReportSection] = []
        labels = summary.get("inputs", {}).get("labels") or ["a", *F._others(table)]
        ref = labels[0] if labels else "a"

        figs["universal_fraction"] = F.fig_universal_fraction(table)
        figs["excess_distribution"] = F.fig_excess_distribution(table, threshold=thr)
        sections.append(ReportSection(
            "universality", "Universality",
            f"Each neuron of the reference model <b>{_e(ref)}</b> is matched to its most correlated neuron in "
            f"every other seed ({_e(', '.join(labels[1:]))}). Its <b>excess correlation</b> is that max-correlation "
            "minus the max-correlation with randomly rotated units of the same seed (the chance baseline), averaged "
            f"over seeds; a neuron is <b>universal</b> when the excess exceeds <b>{thr:g}</b>. Left: the share of "
            "universal neurons per layer (the paper finds them concentrated in the first and last layers). Right: the "
            "distribution of excess correlation on a log scale, universal neurons in red to the right of the cut.",
            ["universal_fraction", "excess_distribution"]))

        figs["corr_distributions"] = F.fig_corr_distributions(table)
        figs["max_corr_vs_baseline"] = F.fig_max_corr_vs_baseline(table, threshold=thr)
        extra = ["pair_correlations"] if F._others(table) else []
        if extra:
            figs["pair_correlations"] = F.fig_pair_correlations(table)
        sections.append(ReportSection(
            "correlations", "Max-correlation vs baseline",
            "Left: per layer, the distribution of each neuron's max-correlation with the other seeds (red, right "
            "half) against its chance baseline (blue, left half); lines mark the means. Right: the same per neuron; "
            "points above the dashed line are universal (ringed in red); hover a point for its layer and index. "
            "Below: the comparison per seed, which should look alike for every seed (boxes span the quartiles, "
            "whiskers the 5th and 95th percentiles).",
            ["corr_distributions", "max_corr_vs_baseline", *extra]))

        ntab, note = _neuron_table(table, properties)
        others = labels[1:] if len(labels) > 1 else F._others(table)
        sections.append(ReportSection(
            "neurons", f"Universal neurons ({int(table['is_universal'].sum()):,})",
            "Every universal neuron of the reference with its partner (best-matching neuron, as "
            f"<code>L&lt;layer&gt;.N&lt;index&gt;</code>) and correlation in each other seed ({_e(', '.join(others))}). "
            "Click a column header to sort; type in the box to filter.",
            html=(f'<p class="note">{_e(note)}</p>' if note else "") + _sortable(ntab, table_id="neuron-table")))

        if properties is not None:
            try:
                figs["property_comparison"] = F.fig_property_comparison(table, properties, comparison=property_comparison)
                names = ["property_comparison"]
                if property_comparison is not None:
                    try:
                        figs["property_effects"] = F.fig_property_effects(property_comparison)
                        names.insert(0, "property_effects")
                    except UniversalNeuronsError as err:
                        log.warning("report: property effects left out: %s", err)
                sections.append(ReportSection(
                    "properties", "Properties of universal neurons",
                    "Weight and activation statistics of universal neurons (red) against all other neurons (grey): "
                    "boxes span the quartiles, whiskers the 5th to 95th percentiles, p-values from a Mann-Whitney U "
                    "test. The paper finds universal neurons to have <b>larger weight norms</b>, <b>more negative "
                    "input bias</b>, <b>higher skew and kurtosis</b> of activations and <b>lower activation "
                    "frequency</b>. Moments (pre_*) are of the pre-activation; vocab_* are moments over the "
                    "vocabulary of cos(w_out, W_U).",
                    names, html=_stage_table(property_comparison, "Comparison per property")))
            except UniversalNeuronsError as err:
                log.warning("report: properties left out: %s", err)

        if ablation_summary is not None:
            try:
                figs["ablation"] = F.fig_ablation(ablation_summary, ablation_runs)
                sections.append(ReportSection(
                    "ablation", "Ablation",
                    "Each group of universal neurons is ablated at once and the change in next-token loss is "
                    "measured on held-out tokens (red, with its confidence interval), next to random control sets "
                    "of the same size drawn from the same layers (grey: mean and interval over draws; dots: single "
                    "draws). A red bar well above the grey means the universal neurons matter more to the model "
                    "than random ones, as the follow-up paper reports.",
                    ["ablation"], html=_stage_table(ablation_summary, "Ablation summary")))
            except UniversalNeuronsError as err:
                log.warning("report: ablation left out: %s", err)

        pers_names = _persistence_figures(persistence or {}, emergence, figs)
        if pers_names:
            sections.append(ReportSection(
                "persistence", "Persistence across training",
                "For training checkpoints t &lt; t′, persistence is the fraction of neurons universal at t that are "
                "still universal at t′ (row: t, column: t′); bright cells right of the diagonal mean universality, "
                "once there, stays. Emergence curves show the universal fraction per layer as training goes on. "
                "The follow-up paper finds persistence highest in the early and deep layers.",
                pers_names))

        sections.append(ReportSection("provenance", "Provenance",
                                      "Everything this report was computed from, so a result can be traced and "
                                      "reproduced.", html=_provenance_html(summary)))
        return cls(title=title or _title(summary, run_dir), headline=_headline(summary, table, ablation_summary),
                   sections=sections, figures=figs, summary=summary, run_dir=Path(run_dir) if run_dir else None)

    # ------------------------------------------------------------------ rendering

    def _fig_html(self, name: str) -> str:
        body = self.figures[name].to_html(full_html=False, include_plotlyjs=False, config=_PLOT_CONFIG,
                                          default_width="100%", div_id=f"fig-{name}")
        return f'<div class="fig" data-figure="{_e(name)}">{body}</div>'

    def to_html(self) -> str:
        """The whole report as one HTML document: plotly.js inlined once, no external resources."""
        from plotly.offline import get_plotlyjs

        nav = "".join(f'<a href="#{s.key}">{_e(s.title)}</a>' for s in self.sections)
        cards = "".join(f'<div class="card"><div class="v{" accent" if acc else ""}">{_e(v)}</div>'
                        f'<div class="k">{_e(k)}</div></div>' for k, v, acc in self.headline)
        parts = []
        for s in self.sections:
            figs = [self._fig_html(n) for n in s.figures]
            pairs = ""
            k = 0
            while k < len(figs):  # two figures side by side when both are compact
                wide = s.figures[k] in ("property_comparison", "persistence_by_layer", "ablation", "emergence")
                if not wide and k + 1 < len(figs) and s.figures[k + 1] not in ("property_comparison", "persistence_by_layer", "ablation", "emergence"):
                    pairs += f'<div class="grid2">{figs[k]}{figs[k + 1]}</div>'
                    k += 2
                else:
                    pairs += figs[k]
                    k += 1
            parts.append(f'<section id="{s.key}"><h2>{_e(s.title)}</h2><p class="intro">{s.intro}</p>{pairs}{s.html}</section>')
        created = self.summary.get("created_utc", "")
        versions = self.summary.get("versions", {})
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{_e(self.title)}</title>"
            f"<style>{_CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f'<header class="un-header"><h1>{_e(self.title)}</h1>'
            f'<div class="sub">{_e(self._subtitle())}</div><div class="cards">{cards}</div></header>'
            f"<nav>{nav}</nav><main>{''.join(parts)}</main>"
            f"<footer>universal-neurons {_e(versions.get('universal-neurons', ''))} · run created {_e(created)} · "
            "this file is self-contained and works offline</footer>"
            f"<script>{_JS}</script></body></html>\n")

    def _subtitle(self) -> str:
        inp = self.summary.get("inputs", {})
        models = [m.get("name", "?") for m in inp.get("models", [])]
        ck = {m.get("checkpoint") for m in inp.get("models", [])}
        ck_s = "final weights" if ck <= {None} else "checkpoint " + ", ".join(str(c) for c in sorted(ck, key=str))
        where = f" · {self.run_dir}" if self.run_dir else ""
        return f"{len(models)} seeds ({', '.join(models)}) · {ck_s}{where}"

    def _repr_html_(self) -> str:
        # An iframe keeps the page's CSS and plotly.js (which registers itself with require.js
        # inside classic notebooks) from touching the notebook; srcdoc needs no server or network.
        return (f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" style="width:100%;height:820px;'
                'border:1px solid #ddd;border-radius:8px" sandbox="allow-scripts allow-popups allow-downloads">'
                "</iframe>")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the report to one HTML file; an existing file is replaced only with `overwrite=True`."""
        p = Path(path)
        if p.exists() and not overwrite:
            raise UniversalNeuronsError(f"{p} already exists; pass overwrite=True (--overwrite) to replace it "
                                        "or choose another path")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_html(), encoding="utf-8")
        os.replace(tmp, p)
        return p


def _persistence_figures(persistence: dict[str, pd.DataFrame], emergence: pd.DataFrame | None,
                         figs: dict[str, go.Figure]) -> list[str]:
    names = []
    builders = [("overall", "persistence", F.fig_persistence), ("per_layer", "persistence_by_layer", F.fig_persistence_by_layer),
                ("partner_consistency", "partner_consistency", F.fig_partner_consistency)]
    for key, name, fn in builders:
        df = persistence.get(key)
        if df is None:
            continue
        try:
            figs[name] = fn(df)
            names.append(name)
        except (UniversalNeuronsError, KeyError, ValueError) as err:
            log.warning("report: %s left out: %s", name, err)
    if emergence is not None:
        try:
            figs["emergence"] = F.fig_emergence(emergence)
            names.append("emergence")
        except UniversalNeuronsError as err:
            log.warning("report: emergence left out: %s", err)
    return names


def _stage_table(df: pd.DataFrame | None, caption: str) -> str:
    if df is None:
        return ""
    tid = re.sub(r"\W+", "-", caption.lower())
    return f"<details><summary>{_e(caption)} (table)</summary>{_sortable(df.round(4), table_id=tid)}</details>"


def _title(summary: dict, run_dir) -> str:
    models = summary.get("inputs", {}).get("models", [])
    name = models[0].get("name", "") if models else ""
    fam = re.sub(r"[-_]?(seed-?)?[a-e]$", "", name) or (Path(run_dir).name if run_dir else "")
    return f"Universal neurons · {fam}" if fam else "Universal neurons"


def _headline(summary: dict, table: pd.DataFrame, ablation: pd.DataFrame | None) -> list[tuple[str, str, bool]]:
    u = summary.get("universality", {})
    n, k = u.get("neurons", len(table)), u.get("universal", int(table["is_universal"].sum()))
    frac = u.get("universal_fraction", k / max(n, 1))
    models = summary.get("inputs", {}).get("models", [])
    first = models[0] if models else {}
    layers = first.get("n_layers") or int(table["layer"].nunique())
    d_mlp = first.get("d_mlp") or int(table.groupby("layer").size().max())
    dead = sum((u.get("dead") or {}).values()) if isinstance(u.get("dead"), dict) else int(table.get("dead", pd.Series([])).sum())
    corr = summary.get("config", {}).get("correlation", {})
    cards = [("universal neurons", f"{k:,} ({100 * frac:.2f}%)", True), ("neurons", f"{n:,} = {layers} × {d_mlp:,}", False),
             ("seeds", str(len(models) or len(F._others(table)) + 1), False),
             ("tokens counted", f"{u.get('n_tokens', 0):,}", False),
             ("threshold", f"excess > {u.get('threshold', 0.5):g}", False),
             ("baseline", f"{corr.get('baseline', '?')} (seed {corr.get('seed', '?')})", False),
             ("dead neurons", f"{dead:,}", False)]
    if ablation is not None and {"delta_ce", "control_delta_ce_mean"} <= set(ablation.columns):
        whole = ablation[ablation["group"].astype(str) == "all layers"]
        a = whole if len(whole) else ablation
        r = a["delta_ce"].sum() / max(abs(a["control_delta_ce_mean"].sum()), 1e-12)
        cards.append(("ΔCE universal / random", f"{r:.1f}×", True))
    return cards


def _provenance_html(summary: dict) -> str:
    inp = summary.get("inputs", {})
    labels = inp.get("labels") or []
    out = []
    models = inp.get("models", [])
    if models:
        rows = []
        for k, m in enumerate(models):
            wp = m.get("weight_processing") or {}
            rows.append({"label": labels[k] if k < len(labels) else "", "name": m.get("name"), "source": m.get("source"),
                         "resolved": m.get("resolved"), "checkpoint": m.get("checkpoint"), "revision": m.get("revision"),
                         "weight processing": ", ".join(f"{a}={b}" for a, b in wp.items()) or "none",
                         "layers × d_mlp": f"{m.get('n_layers')} × {m.get('d_mlp')}", "act_fn": m.get("act_fn"),
                         "dtype": m.get("dtype"), "training": json.dumps(m.get("training_record"))})
        out.append("<h3>Models</h3>" + _sortable(pd.DataFrame(rows), table_id="prov-models"))
    ts = inp.get("token_set", {})
    if ts:
        src = ts.get("source") or {}
        tok = ts.get("tokenizer") or {}
        out.append("<h3>Token set</h3>" + _kv([
            ("hash", ts.get("hash")), ("tokens counted", summary.get("universality", {}).get("n_tokens")),
            ("config", ts.get("config")), ("source", src), ("tokenizer", tok)]))
    if inp.get("mask_policy"):
        out.append("<h3>Mask policy</h3>" + _kv(list(inp["mask_policy"].items())))
    cfg = summary.get("config", {})
    if cfg:
        corr = cfg.get("correlation", {})
        out.append("<h3>Correlation and flagging</h3>" + _kv(
            [("baseline", corr.get("baseline")), ("baseline seed", corr.get("seed")),
             *[(k, v) for k, v in corr.items() if k not in ("baseline", "seed")],
             ("threshold", cfg.get("threshold")), ("process_weights", cfg.get("process_weights")),
             ("store", cfg.get("store")), ("batch_rows", cfg.get("batch_rows"))]))
    for key in ("properties", "ablation", "persistence", "demo"):
        v = summary.get(key)
        if isinstance(v, dict) and v:
            flat = [(k, x) for k, x in v.items() if k not in ("training_records",)]
            out.append(f"<h3>{_e(key.capitalize())} stage</h3>" + _kv(flat))
    versions = summary.get("versions") or (models[0].get("versions") if models else {})
    if versions:
        out.append("<h3>Versions</h3>" + _kv(list(versions.items())))
    meta = [(k, summary.get(k)) for k in ("artefact", "schema_version", "created_utc", "host", "out_dir") if k in summary]
    if meta:
        out.append("<h3>Run</h3>" + _kv(meta))
    raw = html.escape(json.dumps(summary, indent=2, default=str))
    out.append(f"<details><summary>summary.json (everything above, verbatim)</summary><pre>{raw}</pre></details>")
    return "".join(out)


def report_stage(res) -> dict[str, Any]:
    """A `run_pipeline` stage: write `out_dir/report.html` from the run so far (put it last in
    `extra_stages`). The report is derived from the run directory's own outputs, so it is
    rewritten each time the pipeline runs, like the universality table.

    **Returns** `{"report": path}`, added to the summary.
    """
    path = Path(res.out_dir) / "report.html"
    Report.from_run(res.out_dir, summary=res.summary).save(path, overwrite=True)
    log.info("report -> %s", path)
    return {"report": str(path)}
