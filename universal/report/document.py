"""The report object: built from a run directory (or tables in memory), rendered inline in
Jupyter, saved as one self-contained offline HTML file; and the pipeline stage that writes it."""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from universal_neurons.artifacts import atomic_path
from universal_neurons.errors import InputError

from .cards import CARDS_CSS, CARDS_JS, MAX_CARDS
from .findings import Finding, findings, findings_html
from .markup import CSS, JS, PLOT_CONFIG, escape
from .run_dir import load_run
from .sections import ReportSection, build_sections, headline_cards, report_title

__all__ = ["Report", "report_stage"]

log = logging.getLogger(__name__)

# figures drawn across the whole width; the others go two to a row
_WIDE_FIGURES = ("property_comparison", "persistence_by_layer", "ablation", "emergence", "agreement",
                 "alike_over_training")


class Report:
    """The report of one pipeline run: the findings, figures (name -> plotly Figure), sections,
    headline numbers and provenance. Renders inline in Jupyter and saves to one offline HTML file.

    Build it with `Report.from_run(run_dir)`; `report.figures["excess_distribution"]` etc. are
    ordinary plotly figures to restyle or export, `report.findings` the sentences at the top.

    Args:
        title: the page title.
        headline: `(label, value, accent)` cards shown at the top.
        sections: the sections, in order.
        figures: name -> figure, for the names the sections list.
        summary: the run's `summary.json`.
        run_dir: the run directory, shown in the subtitle.
        findings: the sentences under the title (`findings.findings`).
    """

    def __init__(self, *, title: str, headline: list[tuple[str, str, bool]], sections: list[ReportSection],
                 figures: dict[str, go.Figure], summary: dict[str, Any], run_dir: Path | None = None,
                 findings: list[Finding] | None = None):
        self.title = title
        self.findings = findings or []
        self.headline = headline
        self.sections = sections
        self.figures = figures
        self.summary = summary
        self.run_dir = run_dir

    def __repr__(self) -> str:
        return (f"Report({self.title!r}, sections={[s.key for s in self.sections]}, "
                f"figures={list(self.figures)})")

    # ------------------------------------------------------------------ building

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, *, summary: dict | None = None, title: str | None = None,
                 max_cards: int = MAX_CARDS) -> "Report":
        """Read a run directory (see `load_run`) and build every section whose inputs exist.

        Args:
            run_dir: the output directory of a pipeline run.
            summary: replaces `summary.json` (the pipeline's report stage passes the summary it
                is about to write).
            title: the page title (default: named after the family).
            max_cards: the cap on neuron cards (the highest excess correlation first).

        Returns:
            The report.

        Raises:
            InputNotFoundError: `run_dir` has no summary or universality table.
        """
        run = load_run(run_dir, summary=summary)
        return cls.from_data(**run, title=title, max_cards=max_cards)

    @classmethod
    def from_data(cls, *, summary: dict, table: pd.DataFrame, properties: pd.DataFrame | None = None,
                  property_comparison: pd.DataFrame | None = None, ablation_summary: pd.DataFrame | None = None,
                  ablation_runs: pd.DataFrame | None = None, persistence: dict[str, pd.DataFrame] | None = None,
                  emergence: pd.DataFrame | None = None, explanations: Any = None, agreement: Any = None,
                  run_dir: str | os.PathLike | None = None, title: str | None = None,
                  max_cards: int = MAX_CARDS) -> "Report":
        """The same from tables already in memory (e.g. a notebook's own results).

        Args:
            summary: a run summary (as in `summary.json`).
            table: the universality table, one row per reference neuron.
            properties, property_comparison, ablation_summary, ablation_runs, persistence,
                emergence: the later stages' tables (see `build_sections`), None when absent.
            explanations: the explanations stage's `ExplanationData` (the neuron cards), or None.
            agreement: the agreement stage's `AgreementResult`, or None.
            run_dir: shown in the subtitle.
            title: the page title (default: named after the family).
            max_cards: the cap on neuron cards (the highest excess correlation first).

        Returns:
            The report.
        """
        sections, figs = build_sections(summary=summary, table=table, properties=properties,
                                        property_comparison=property_comparison,
                                        ablation_summary=ablation_summary, ablation_runs=ablation_runs,
                                        persistence=persistence, emergence=emergence, explanations=explanations,
                                        agreement=agreement, max_cards=max_cards)
        said = findings(summary=summary, table=table, property_comparison=property_comparison,
                        ablation_summary=ablation_summary, emergence=emergence, agreement=agreement,
                        explanations=explanations)
        return cls(title=title or report_title(summary, run_dir),
                   headline=headline_cards(summary, table, ablation_summary, agreement), sections=sections,
                   figures=figs, summary=summary, run_dir=Path(run_dir) if run_dir else None, findings=said)

    def only(self, *keys: str) -> "Report":
        """The same report with only the sections named, and no Findings or numbers at the top:
        e.g. `report.only("neurons")` shows the neuron cards alone in a notebook.

        Args:
            *keys: section keys (`[s.key for s in report.sections]`).

        Returns:
            A new report sharing this one's figures.

        Raises:
            InputError: a key names no section of this report.
        """
        have = [s.key for s in self.sections]
        unknown = [k for k in keys if k not in have]
        if unknown:
            raise InputError(f"the report has no section {unknown}; it has {have}")
        sections = [s for s in self.sections if s.key in keys]
        return Report(title=self.title, headline=[], sections=sections,
                      figures={n: self.figures[n] for s in sections for n in s.figures}, summary=self.summary,
                      run_dir=self.run_dir)

    # ------------------------------------------------------------------ rendering

    def _fig_html(self, name: str) -> str:
        body = self.figures[name].to_html(full_html=False, include_plotlyjs=False, config=PLOT_CONFIG,
                                          default_width="100%", div_id=f"fig-{name}")
        return f'<div class="fig" data-figure="{escape(name)}">{body}</div>'

    def _section_html(self, section: ReportSection) -> str:
        figs = [self._fig_html(name) for name in section.figures]
        body = ""
        k = 0
        while k < len(figs):  # two figures side by side when both are compact
            wide = section.figures[k] in _WIDE_FIGURES
            if not wide and k + 1 < len(figs) and section.figures[k + 1] not in _WIDE_FIGURES:
                body += f'<div class="grid2">{figs[k]}{figs[k + 1]}</div>'
                k += 2
            else:
                body += figs[k]
                k += 1
        return (f'<section id="{section.key}"><h2>{escape(section.title)}</h2><p class="intro">{section.intro}</p>'
                f'{body}{section.html}</section>')

    def to_html(self) -> str:
        """The whole report as one HTML document: plotly.js inlined once, no external resources.

        Returns:
            The page.
        """
        from plotly.offline import get_plotlyjs

        from universal_neurons.explain.view import HTML_STYLE

        nav = "".join(f'<a href="#{s.key}">{escape(s.title)}</a>' for s in self.sections)
        cards = "".join(f'<div class="card"><div class="v{" accent" if accent else ""}">{escape(value)}</div>'
                        f'<div class="k">{escape(label)}</div></div>' for label, value, accent in self.headline)
        parts = "".join(self._section_html(s) for s in self.sections)
        created = self.summary.get("created_utc", "")
        versions = self.summary.get("versions", {})
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(self.title)}</title>"
            f"<style>{CSS}{HTML_STYLE}{CARDS_CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f'<header class="un-header"><h1>{escape(self.title)}</h1>'
            f'<div class="sub">{escape(self._subtitle())}</div>{findings_html(self.findings)}'
            f'<div class="cards">{cards}</div></header>'
            f"<nav>{nav}</nav><main>{parts}</main>"
            f"<footer>universal-neurons {escape(versions.get('universal-neurons', ''))} · run created "
            f"{escape(created)} · this file is self-contained and works offline</footer>"
            f"<script>{JS}{CARDS_JS}</script></body></html>\n")

    def _subtitle(self) -> str:
        inputs = self.summary.get("inputs", {})
        models = [m.get("name", "?") for m in inputs.get("models", [])]
        checkpoints = {m.get("checkpoint") for m in inputs.get("models", [])}
        weights = ("final weights" if checkpoints <= {None}
                   else "checkpoint " + ", ".join(str(c) for c in sorted(checkpoints, key=str)))
        where = f" · {self.run_dir}" if self.run_dir else ""
        return f"{len(models)} seeds ({', '.join(models)}) · {weights}{where}"

    def _repr_html_(self) -> str:
        # An iframe keeps the page's CSS and plotly.js (which registers itself with require.js
        # inside classic notebooks) from touching the notebook; srcdoc needs no server or network.
        return (f'<iframe srcdoc="{html.escape(self.to_html(), quote=True)}" style="width:100%;height:820px;'
                'border:1px solid #ddd;border-radius:8px" sandbox="allow-scripts allow-popups allow-downloads">'
                "</iframe>")

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the report to one HTML file, atomically.

        Args:
            path: the output file.
            overwrite: replace an existing file.

        Returns:
            `path` as a `Path`.

        Raises:
            OutputExistsError: `path` exists and `overwrite` is False (checked before rendering).
        """
        with atomic_path(path, overwrite=overwrite) as tmp:
            tmp.write_text(self.to_html(), encoding="utf-8")
        return Path(path)


def report_stage(result) -> dict[str, Any]:
    """A `run_pipeline` stage: write `out_dir/report.html` from the run so far (put it last in
    `extra_stages`). The report is derived from the run directory's own outputs, so it is
    rewritten each time the pipeline runs, like the universality table.

    Args:
        result: the `PipelineResult` so far.

    Returns:
        `{"report": path}`, added to the summary.
    """
    path = Path(result.out_dir) / "report.html"
    Report.from_run(result.out_dir, summary=result.summary).save(path, overwrite=True)
    log.info("report -> %s", path)
    return {"report": str(path)}
