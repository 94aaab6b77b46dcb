"""The report's neuron cards: one card per universal neuron, the explanations stage's own view
(`universal_neurons.explain.NeuronExplanation`) rendered once per neuron, shown a page at a time.

A report of a large family holds thousands of cards, and a page that builds them all at load
would freeze. So the cards' HTML travels as JSON inside the page, and a short script puts one
page of them into the document at a time (filtered by layer and family). When the cards' HTML
is large, each card is gzip-compressed and base64-encoded, and the browser inflates the cards
of the page it shows (`DecompressionStream`), which keeps the file a fraction of the size.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from .markup import escape

__all__ = ["CARD_CONTEXTS", "CARDS_CSS", "CARDS_JS", "INLINE_LIMIT", "MAX_CARDS", "PAGE_SIZE", "NeuronCards",
           "cards_html", "neuron_cards"]

log = logging.getLogger(__name__)

MAX_CARDS = 2000  # cards in one report; beyond, the neurons with the highest excess correlation
CARD_CONTEXTS = 5  # top contexts per card (the explanations hold more: `explain()` shows them all)
PAGE_SIZE = 10  # cards put into the page at once
INLINE_LIMIT = 2_000_000  # bytes of card HTML kept as plain text; beyond, every card is compressed


@dataclass
class NeuronCards:
    """The cards of a report's Neurons section.

    Attributes:
        cards: one dict per card, highest excess correlation first: `id` (`a:1.23`), `layer`,
            `neuron`, `family` (the reference neuron's, from the explanations), `excess`, `role`,
            `html` (the explanation's fragment).
        n_available: the neurons of the chosen role the explanations hold (before the cap).
        role: `universal`, or `contrast` when no neuron is universal (the contrast neurons are shown).
        notes: what was left out and why, one sentence each.
    """

    cards: list[dict[str, Any]]
    n_available: int
    role: str = "universal"
    notes: list[str] = field(default_factory=list)


def neuron_cards(data, *, n_universal: int | None = None, max_cards: int = MAX_CARDS,
                 n_contexts: int = CARD_CONTEXTS) -> NeuronCards:
    """One card per universal neuron of the explanations, up to `max_cards` (highest excess first).

    Args:
        data: the explanations (`universal_neurons.explain.ExplanationData`, e.g. from
            `load_explanations(run_dir / "explanations")`).
        n_universal: the run's count of universal neurons, to say when the explanations cover
            fewer (e.g. computed at another threshold); None skips that note.
        max_cards: the cap on cards.
        n_contexts: top contexts per card.

    Returns:
        The cards. Without universal groups, the contrast (or chosen) groups are shown instead,
        with a note.
    """
    from universal_neurons.explain import NeuronExplanation

    groups = data.provenance.get("groups", [])
    role = "universal"
    chosen = [g for g, info in enumerate(groups) if info.get("role") == "universal"]
    notes = []
    if not chosen and groups:
        role = "contrast"
        chosen = list(range(len(groups)))
        notes.append("No neuron of the explanations is universal; the neurons explained for contrast are shown.")
    elif n_universal is not None and len(chosen) != n_universal:
        notes.append(f"The explanations hold {len(chosen):,} universal neurons and the universality table "
                     f"{n_universal:,}: they were computed from another table or threshold; rerun "
                     "`universal-neurons explain RUN --all --overwrite` to match.")

    def order(g: int) -> tuple[float, int, int]:
        excess = float(groups[g].get("excess_corr", math.nan))
        return (-excess if math.isfinite(excess) else math.inf, int(groups[g]["layer"]), int(groups[g]["neuron"]))

    chosen.sort(key=order)
    n_available = len(chosen)
    if n_available > max_cards:
        notes.append(f"The {max_cards:,} neurons with the highest excess correlation of {n_available:,} have a card.")
        chosen = chosen[:max_cards]
    cards = []
    for view in NeuronExplanation.many(data, chosen, n_contexts=n_contexts, quantile_examples=0):
        ref = view.reference
        excess = float(view.info.get("excess_corr", math.nan))
        cards.append({"id": f"{ref.label}:{int(ref.layer)}.{int(ref.neuron)}", "layer": int(ref.layer),
                      "neuron": int(ref.neuron), "family": str(ref.family), "role": str(view.info.get("role", "")),
                      "excess": round(excess, 4) if math.isfinite(excess) else None, "html": view.html_fragment()})
    log.info("report: %d neuron cards", len(cards))
    return NeuronCards(cards=cards, n_available=n_available, role=role, notes=notes)


def _payload(cards: NeuronCards, page_size: int) -> str:
    """The cards as JSON for a `<script type="application/json">`: HTML as text when small, else
    each card gzip-compressed (fixed mtime: the same report gives the same bytes) and base64."""
    size = sum(len(c["html"].encode()) for c in cards.cards)
    compress = size > INLINE_LIMIT
    out = []
    for c in cards.cards:
        body = (base64.b64encode(gzip.compress(c["html"].encode(), mtime=0)).decode("ascii") if compress
                else c["html"])
        out.append({"id": c["id"], "l": c["layer"], "f": c["family"], "x": c["excess"], "h": body})
    text = json.dumps({"enc": "gzip" if compress else "html", "page": page_size, "cards": out},
                      ensure_ascii=False, separators=(",", ":"))
    # inside <script> only "</" (a closing tag) and "<!--" could end or confuse the element
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")


def cards_html(cards: NeuronCards, *, page_size: int = PAGE_SIZE) -> str:
    """The Neurons section's card browser: filters, page controls, the cards' data, an empty list
    that `CARDS_JS` fills a page at a time.

    Args:
        cards: from `neuron_cards`.
        page_size: cards per page.

    Returns:
        The HTML (the page's script and `CARDS_CSS` do the rest).
    """
    layers = sorted({c["layer"] for c in cards.cards})
    families = sorted({c["family"] for c in cards.cards})
    options = "".join(f'<option value="{layer}">{layer}</option>' for layer in layers)
    fam_options = "".join(f'<option value="{escape(f)}">{escape(f)}</option>' for f in families)
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in cards.notes)
    return (f'{notes}<div class="cards-ui" id="neuron-cards" data-n="{len(cards.cards)}">'
            '<div class="cards-bar">'
            f'<label>layer <select data-filter="layer"><option value="">all</option>{options}</select></label>'
            f'<label>family <select data-filter="family"><option value="">all</option>{fam_options}</select></label>'
            '<input class="cards-search" type="search" placeholder="neuron, e.g. a:1.23">'
            '<span class="cards-pager"><button type="button" data-step="-1">‹ previous</button>'
            '<span class="cards-count"></span><button type="button" data-step="1">next ›</button></span></div>'
            '<div class="cards-list"><p class="note">Loading the cards…</p></div>'
            f'<script type="application/json" class="cards-data">{_payload(cards, page_size)}</script></div>')


CARDS_CSS = """
.cards-bar{display:flex;flex-wrap:wrap;gap:14px;align-items:center;margin:8px 0 10px;padding:6px 0;
  border-bottom:1px solid var(--line)}
.cards-bar label{color:var(--muted);font-size:13px}
.cards-bar select,.cards-bar input,.cards-bar button{padding:4px 8px;border:1px solid var(--line);border-radius:6px;
  background:#fff;font:inherit;font-size:13px}
.cards-bar button{cursor:pointer}.cards-bar button:disabled{cursor:default;opacity:.4}
.cards-pager{display:flex;gap:8px;align-items:center;margin-left:auto}
.cards-count{color:var(--muted);font-size:13px;font-variant-numeric:tabular-nums}
.ncard{border:1px solid var(--line);border-radius:10px;padding:6px 14px 10px;margin:0 0 14px;overflow-x:auto}
.ncard .unx{max-width:none}
"""

CARDS_JS = """
(function(){
  var root=document.getElementById('neuron-cards'); if(!root) return;
  var data=JSON.parse(root.querySelector('script.cards-data').textContent);
  var cards=data.cards, size=data.page, page=0, shown=[], cache={}, drawn=0;
  var list=root.querySelector('.cards-list'), count=root.querySelector('.cards-count');
  var layer=root.querySelector('select[data-filter=layer]'), family=root.querySelector('select[data-filter=family]');
  var search=root.querySelector('input.cards-search'), buttons=root.querySelectorAll('.cards-pager button');
  function inflate(b64){
    var bytes=Uint8Array.from(atob(b64),function(c){return c.charCodeAt(0);});
    var stream=new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
    return new Response(stream).text();
  }
  function body(i){
    if(cache[i]!==undefined) return Promise.resolve(cache[i]);
    var p=data.enc==='gzip'?inflate(cards[i].h):Promise.resolve(cards[i].h);
    return p.then(function(h){cache[i]=h;return h;});
  }
  function filter(){
    var l=layer.value, f=family.value, q=search.value.trim().toLowerCase();
    shown=[];
    for(var i=0;i<cards.length;i++){
      var c=cards[i];
      if((l===''||String(c.l)===l)&&(f===''||c.f===f)&&(q===''||c.id.toLowerCase().indexOf(q)>=0)) shown.push(i);
    }
    page=0; draw();
  }
  function draw(){
    var pages=Math.max(1,Math.ceil(shown.length/size)); page=Math.min(Math.max(page,0),pages-1);
    var part=shown.slice(page*size,page*size+size), ticket=++drawn;
    count.textContent=shown.length?('cards '+(page*size+1)+'–'+(page*size+part.length)+' of '+shown.length
      +(shown.length<cards.length?' (filtered from '+cards.length+')':'')):'no card matches';
    buttons[0].disabled=page===0; buttons[1].disabled=page>=pages-1;
    if(data.enc==='gzip'&&typeof DecompressionStream==='undefined'){
      list.innerHTML='<p class="note">This browser cannot decompress the cards (no DecompressionStream): open '
        +'the report in a current Chrome, Edge, Firefox or Safari.</p>'; return;
    }
    Promise.all(part.map(body)).then(function(htmls){
      if(ticket!==drawn) return;
      list.innerHTML=htmls.map(function(h,k){var c=cards[part[k]];
        return '<article class="ncard" data-id="'+c.id+'" data-layer="'+c.l+'" data-family="'+c.f+'">'+h+'</article>';
      }).join('')||'<p class="note">No card matches the filters.</p>';
      root.setAttribute('data-page',String(page)); root.setAttribute('data-drawn',String(ticket));
      if(!window.unCardsFirstDrawn) window.unCardsFirstDrawn=performance.now();
    });
  }
  layer.addEventListener('change',filter); family.addEventListener('change',filter);
  search.addEventListener('input',filter);
  buttons[0].addEventListener('click',function(){page-=1;draw();root.scrollIntoView();});
  buttons[1].addEventListener('click',function(){page+=1;draw();root.scrollIntoView();});
  filter();
})();
"""
