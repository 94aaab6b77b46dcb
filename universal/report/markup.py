"""The report's page parts: its stylesheet and script (inline, so the file works offline) and
the small HTML helpers every section uses (escaping, number formatting, key-value and
click-to-sort tables)."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["PLOT_CONFIG", "CSS", "JS", "escape", "format_value", "key_value_table", "sortable_table", "stage_table"]

PLOT_CONFIG = {"displaylogo": False, "responsive": True,
               "toImageButtonOptions": {"format": "png", "scale": 2}}


def escape(value: Any) -> str:
    """`str(value)` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def format_value(value: Any, digits: int = 3) -> str:
    """A cell's text: yes/no for booleans, thousands separators for integers, `digits`
    decimals for floats, "–" for None and non-finite numbers, JSON for dicts and lists."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return "–" if not np.isfinite(value) else f"{value:.{digits}f}"
    if value is None:
        return "–"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def key_value_table(rows: list[tuple[str, Any]]) -> str:
    """A two-column table of `(name, value)` rows."""
    body = "".join(f"<tr><th>{escape(name)}</th><td>{escape(format_value(value))}</td></tr>" for name, value in rows)
    return f'<table class="kv">{body}</table>'


def sortable_table(df: pd.DataFrame, *, table_id: str, caption: str = "") -> str:
    """A table sorted by clicking a column header and filtered by a search box (the page's
    inline script, no library). Numeric cells carry their value in `data-v` to sort by.

    Args:
        df: the rows to show, one `<tr>` each.
        table_id: the HTML id of the table.
        caption: text under the table (HTML).

    Returns:
        The HTML of the filter box and the table.
    """
    head = "".join(f'<th title="click to sort">{escape(column)}</th>' for column in df.columns)
    rows = []
    for record in df.itertuples(index=False):
        cells = []
        for value in record:
            numeric = (isinstance(value, (int, float, np.integer, np.floating))
                       and not isinstance(value, (bool, np.bool_)))
            attr = f' data-v="{float(value)!r}"' if numeric and np.isfinite(value) else ""
            cells.append(f'<td{attr}{" class=num" if numeric else ""}>{escape(format_value(value))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{caption}</caption>" if caption else ""
    return (f'<input class="filter" type="search" placeholder="filter rows…" data-table="{table_id}">'
            f'<div class="scroll"><table class="sortable" id="{table_id}">{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def stage_table(df: pd.DataFrame | None, caption: str) -> str:
    """A stage's output table (rounded to 4 decimals), folded away under `caption`; "" for None."""
    if df is None:
        return ""
    table_id = re.sub(r"\W+", "-", caption.lower())
    return (f"<details><summary>{escape(caption)} (table)</summary>"
            f"{sortable_table(df.round(4), table_id=table_id)}</details>")


CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#e3e6ec;--bg:#f6f7f9;--accent:#d62728;--card:#fff}
*{box-sizing:border-box}
body{margin:0;font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
.un-header{background:linear-gradient(135deg,#1d2330,#36405a);color:#fff;padding:28px 40px 22px}
.un-header h1{margin:0 0 4px;font-size:26px;font-weight:650}
.un-header .sub{color:#c8cfdc;font-size:13px}
.findings{background:#fff;color:var(--fg);border-radius:10px;padding:10px 22px 12px;margin:16px 0 4px;
  max-width:1200px;box-shadow:0 2px 10px rgba(0,0,0,.25)}
.findings h2{font-size:16px;margin:4px 0 6px}
.findings ul{margin:0;padding-left:18px}
.findings li{margin:4px 0;line-height:1.45}
.findings .sig,.findings .ns{font-size:11px;padding:0 6px;border-radius:8px;white-space:nowrap}
.findings .sig{background:#fde2e1;color:#a31515}
.findings .ns{background:#eceef2;color:var(--muted)}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:18px}
.card{background:rgba(255,255,255,.09);border:1px solid rgba(255,255,255,.15);border-radius:10px;
  padding:10px 16px;min-width:150px}
.card .v{font-size:22px;font-weight:650}
.card .v.accent{color:#ff8a80}
.card .k{font-size:12px;color:#c8cfdc;text-transform:uppercase;letter-spacing:.04em}
nav{position:sticky;top:0;z-index:10;background:#fff;border-bottom:1px solid var(--line);padding:8px 40px;
  display:flex;gap:18px;flex-wrap:wrap}
nav a{color:var(--muted);text-decoration:none;font-size:13px}
nav a:hover{color:var(--accent)}
main{max-width:1280px;margin:0 auto;padding:10px 40px 60px}
section{scroll-margin-top:44px;background:var(--card);border:1px solid var(--line);border-radius:12px;margin:22px 0;
  padding:8px 24px 20px}
section h2{font-size:19px;margin:14px 0 4px}
.intro{color:var(--muted);max-width:920px;margin:0 0 8px}
.intro b{color:var(--fg)}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:8px}
@media (max-width:1000px){.grid2{grid-template-columns:1fr}}
.fig{min-height:300px}
table{border-collapse:collapse;font-size:13px}
table.kv th{text-align:left;color:var(--muted);font-weight:500;padding:3px 16px 3px 0;vertical-align:top;
  white-space:nowrap}
table.kv td{padding:3px 0;font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px;word-break:break-all}
table.sortable{width:100%}
table.sortable th{position:sticky;top:0;background:#eef0f4;cursor:pointer;padding:6px 10px;text-align:left;
  white-space:nowrap;user-select:none}
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

JS = """
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
