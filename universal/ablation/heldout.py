"""Which tokens an ablation is measured on, against the tokens that chose the neurons.

An ablation measured on the very tokens that made its neurons universal measures them where
they were selected to look special. Every result therefore records the study token set's hash
(from the universality table's provenance, or given) and how its own tokens relate to it:

    held-out   built from the same text with the study set's rows excluded (`held_out_from`)
    same       the very token set of the study: ΔCE is not held out (a loud warning)
    different  another token set; whether its rows overlap the study's is not recorded
    unknown    the study's token set is not recorded (e.g. a plain list of neurons)
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from universal_neurons.activations import TokenSet

__all__ = ["study_hash", "token_relation"]

log = logging.getLogger(__name__)


def study_hash(table_or_neurons) -> str | None:
    """The hash of the token set a universality table was computed on, from its provenance.

    Args:
        table_or_neurons: a table as `universality_table` returns it (`attrs['correlation_provenance']`)
            or `load_universality_table` reads it (`attrs['provenance']`); anything else has none.

    Returns:
        The token-set hash, or None when not recorded.
    """
    if not isinstance(table_or_neurons, pd.DataFrame):
        return None
    for prov in (table_or_neurons.attrs.get("provenance"), table_or_neurons.attrs.get("correlation_provenance")):
        for p in (prov, (prov or {}).get("correlation")):
            h = ((p or {}).get("token_set") or {}).get("hash") if isinstance(p, dict) else None
            if h:
                return str(h)
    return None


def token_relation(ts: TokenSet, study: str | None) -> dict[str, Any]:
    """How the evaluated token set relates to the study's, for the result's provenance.

    Args:
        ts: the tokens the ablation is measured on.
        study: the hash of the token set that chose the neurons, or None.

    Returns:
        `{"study_hash", "relation_to_study", "disjoint_from", "warning"}`; `warning` is None unless
        the tokens are the study's own (then it is also logged).
    """
    held_from = (ts.source.get("held_out_from") or {}).get("hash")
    if study is None:
        relation = "unknown"
    elif ts.hash == study:
        relation = "same"
    elif held_from == study:
        relation = "held-out"
    else:
        relation = "different"
    warning = None
    if study is not None and relation == "same":
        warning = (f"the ablation is measured on the token set that chose the universal neurons ({study[:12]}), not "
                   "on held-out tokens: ΔCE there is biased towards the selection. Build held-out tokens with "
                   "build_token_set(..., held_out_from=study_tokens) or `run` (which holds rows out by default)")
        log.warning("%s", warning)
    return {"study_hash": study, "relation_to_study": relation,
            "disjoint_from": held_from if relation == "held-out" else None, "warning": warning}
