"""Stage: a pipeline run directory -> one self-contained HTML report.

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
    explanations/                           a card per universal neuron in the Neurons section
                                            (universal_neurons.explain, its own view of each neuron)
    agreement/                              how alike the seeds behave over training (universal_neurons.agreement)

The page opens with the Findings (`findings.py`): plain sentences generated from those numbers,
each with its uncertainty (Wilson interval, bootstrap intervals, p-values), saying so when a
result is not significant. `report.findings` holds them; `report.only("neurons")` shows one
section alone in a notebook.

`report_stage` is the same as a pipeline stage: `run_pipeline(..., extra_stages=[..., report_stage])`
(last, since stages run in order and the report shows what the earlier ones wrote).
"""

from __future__ import annotations

from .cards import NeuronCards, neuron_cards
from .document import Report, report_stage
from .findings import Finding, findings
from .run_dir import load_run
from .sections import ReportSection

__all__ = ["Finding", "NeuronCards", "Report", "ReportSection", "findings", "load_run", "neuron_cards", "report_stage"]
