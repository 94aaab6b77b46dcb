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

`report_stage` is the same as a pipeline stage: `run_pipeline(..., extra_stages=[..., report_stage])`
(last, since stages run in order and the report shows what the earlier ones wrote).
"""

from __future__ import annotations

from .document import Report, report_stage
from .run_dir import load_run
from .sections import ReportSection

__all__ = ["Report", "ReportSection", "load_run", "report_stage"]
