"""The binary features a neuron's activation is explained by (docs/explanations.md): each
frequent token alone (unigram), token classes read off the decoded vocabulary, first letters
(alphabet), position buckets and sequence features, for the current and the previous token.

Every feature is a set of token ids (of the current or the previous token) or a range of
positions, so its count and activation sum follow from per-id and per-position sums
(`FeatureSet.stats`): the pass over the tokens never looks at a feature itself.
"""

from __future__ import annotations

import re
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

__all__ = ["CLASS_DEFINITIONS", "FeatureSet", "token_classes", "build_features", "vocab_texts"]

_PRONOUNS = {
    "first_person": {"i", "me", "my", "mine", "myself", "we", "us", "our", "ours", "ourselves"},
    "second_person": {"you", "your", "yours", "yourself", "yourselves", "thou", "thee", "thy", "thine"},
    "third_person": {"he", "him", "his", "himself", "she", "her", "hers", "herself", "it", "its", "itself", "they",
                     "them", "their", "theirs", "themselves"},
}
_OPEN, _CLOSE = set("([{<"), set(")]}>")
_QUOTES = set("\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb")


def _punct(w: str) -> bool:
    return bool(w) and all(unicodedata.category(c)[0] in "PS" for c in w)


def _only(chars: set[str]) -> Callable[[str], bool]:
    return lambda w: bool(w) and set(w) <= chars


def _other_punct(w: str) -> bool:
    return _punct(w) and not (set(w) <= _OPEN or set(w) <= _CLOSE or set(w) <= _QUOTES or w == "," or set(w) <= {"."})


def _pronoun(words: set[str]) -> Callable[[str, str], bool]:
    return lambda s, w: w.lower() in words


def _letter(c: str) -> Callable[[str, str], bool]:
    return lambda s, w: w[:1].lower() == c


# name -> (definition, predicate on (decoded text s, stripped text w)); the special-token class is added by id
_CLASSES: dict[str, tuple[str, Callable[[str, str], bool]]] = {
    "leading_space": ("the token's text starts with a space", lambda s, w: s[:1] == " "),
    "capitalised": ("the first non-space character is upper case", lambda s, w: w[:1].isupper()),
    "all_caps": ("at least two letters, all upper case", lambda s, w: sum(c.isalpha() for c in w) >= 2 and w.isupper()),
    "lowercase_word": ("only letters, all lower case", lambda s, w: w.isalpha() and w.islower()),
    "alphabetic": ("only letters (after stripping spaces)", lambda s, w: w.isalpha()),
    "numeric": ("only the digits 0-9", lambda s, w: re.fullmatch(r"[0-9]+", w) is not None),
    "contains_digit": ("at least one digit", lambda s, w: any(c.isdigit() for c in w)),
    "year": ("a four-digit year 1500-2099", lambda s, w: re.fullmatch(r"(1[5-9]|20)[0-9]{2}", w) is not None),
    "punctuation": ("only punctuation or symbol characters (Unicode P*, S*)", lambda s, w: _punct(w)),
    "open_bracket": ("only opening brackets ( [ { <", lambda s, w: _only(_OPEN)(w)),
    "close_bracket": ("only closing brackets ) ] } >", lambda s, w: _only(_CLOSE)(w)),
    "quote": ("only quote marks", lambda s, w: _only(_QUOTES)(w)),
    "comma": ("a comma", lambda s, w: w == ","),
    "period": ("only full stops (. or ...)", lambda s, w: _only({"."})(w)),
    "other_punctuation": ("punctuation that is none of brackets, quotes, comma, full stop",
                          lambda s, w: _other_punct(w)),
    "whitespace": ("only whitespace", lambda s, w: s != "" and s.isspace()),
    "newline": ("contains a newline", lambda s, w: "\n" in s),
    **{f"pronoun_{k}": (f"a {k.replace('_', ' ')} pronoun ({', '.join(sorted(v))})", _pronoun(v))
       for k, v in _PRONOUNS.items()},
}
_ALPHABET = {f"letter_{c}": (f"starts (after spaces) with the letter {c} or {c.upper()}", _letter(c))
             for c in string.ascii_lowercase}
_SEQUENCE = {"start_of_document": "the previous token is BOS/EOS (a document starts here)",
             "after_newline": "the previous token contains a newline"}

CLASS_DEFINITIONS: dict[str, str] = {
    **{k: v[0] for k, v in _CLASSES.items()},
    "special": "a special token (BOS, EOS, pad)",
    **{k: v[0] for k, v in _ALPHABET.items()},
    **_SEQUENCE,
}


def vocab_texts(tokenizer, size: int) -> list[str]:
    """Each id's decoded text, `[vocab]`; ids beyond the tokenizer (a padded vocabulary) decode to ''."""
    n = min(int(size), len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return list(texts) + [""] * (int(size) - n)


def token_classes(texts: Sequence[str], special_ids: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Membership of every vocabulary id in every token class (`CLASS_DEFINITIONS`).

    Args:
        texts: `[vocab]` decoded text of each id (`vocab_texts`).
        special_ids: BOS / EOS / pad ids.

    Returns:
        class name -> `Bool[ndarray, "vocab"]`, token classes first, then `special`, then `letter_a..z`.
    """
    stripped = [s.strip() for s in texts]
    out = {name: np.fromiter((f(s, w) for s, w in zip(texts, stripped)), bool, len(texts))
           for name, (_, f) in _CLASSES.items()}
    special = np.zeros(len(texts), bool)
    special[[i for i in special_ids if 0 <= i < len(texts)]] = True
    out["special"] = special
    for name, (_, f) in _ALPHABET.items():
        out[name] = np.fromiter((f(s, w) for s, w in zip(texts, stripped)), bool, len(texts))
    return out


@dataclass
class FeatureSet:
    """The features of one run, as sets of ids (current or previous token) and position ranges.

    Attributes:
        table: one row per feature: `feature` (its index), `key` (stable id, e.g. `cur:id:262`,
            `prev:class:capitalised`, `pos:4-7`, `seq:after_newline`), `name` (readable), `kind`
            (`unigram`, `class`, `alphabet`, `position`, `sequence`), `side` (`current`,
            `previous`, `position`), `token_id` (unigram features, else -1), `definition`.
        unigram_ids: `[unigram]` the ids with a unigram feature, most frequent first.
        classes: class name -> `Bool[ndarray, "vocab"]` (`token_classes`).
        edges: position bucket edges, bucket i = `[edges[i], edges[i+1])`.
    """

    table: pd.DataFrame
    unigram_ids: np.ndarray
    classes: dict[str, np.ndarray]
    edges: list[int]
    _groups: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    def stats(self, count_cur: torch.Tensor, sum_cur: torch.Tensor, count_prev: torch.Tensor, sum_prev: torch.Tensor,
              count_pos: torch.Tensor, sum_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Count and activation sum of every feature from per-id and per-position sums.

        Args:
            count_cur, sum_cur: `[vocab]` counted tokens of each id and `[vocab, neuron]` their
                (shifted) activation sums.
            count_prev, sum_prev: the same by previous token, `[vocab + 1]` / `[vocab + 1, neuron]`
                (the last slot: no previous token).
            count_pos, sum_pos: the same by position, `[pos]` / `[pos, neuron]`.

        Returns:
            `(count [feature], sum [feature, neuron])`, float64 on the sums' device.
        """
        dev, n = sum_cur.device, sum_cur.shape[1]
        counts = torch.zeros(len(self), dtype=torch.float64, device=dev)
        sums = torch.zeros(len(self), n, dtype=torch.float64, device=dev)
        for side, (cnt, sm) in (("current", (count_cur, sum_cur)), ("previous", (count_prev, sum_prev))):
            v = len(next(iter(self.classes.values())))
            cnt, sm = cnt[:v].double(), sm[:v]
            rows, ids = self._groups[f"{side}:unigram"]
            if len(rows):
                idx = torch.as_tensor(ids, device=dev)
                counts[rows], sums[rows] = cnt[idx], sm[idx]
            rows, member = self._groups[f"{side}:sets"]
            if len(rows):
                m = torch.as_tensor(member, dtype=torch.float64, device=dev)  # [vocab, sets]
                counts[rows], sums[rows] = m.T @ cnt, m.T @ sm
        rows, bucket = self._groups["position"]
        for r, (lo, hi) in zip(rows, bucket):
            counts[r], sums[r] = count_pos[lo:hi].double().sum(), sum_pos[lo:hi].sum(0)
        return counts, sums


def build_features(texts: Sequence[str], id_counts: np.ndarray, ctx_len: int, *, n_unigrams: int,
                   edges: Sequence[int], special_ids: Sequence[int] = ()) -> FeatureSet:
    """The feature set of a run.

    Args:
        texts: `[vocab]` decoded text of each id.
        id_counts: `[vocab]` counted tokens of each id (current token): the `n_unigrams` most
            frequent ids (ties: lower id first) get a unigram feature each.
        ctx_len: row length (for the position buckets).
        n_unigrams: unigram features per side.
        edges: position bucket edges ending in `ctx_len`.
        special_ids: BOS / EOS / pad ids.

    Returns:
        A `FeatureSet`: current-token unigrams, classes and letters; the same for the previous
        token (its `special` and `newline` classes become the sequence features
        `start_of_document` and `after_newline`); position buckets.
    """
    counts = np.asarray(id_counts, np.int64)
    order = np.lexsort((np.arange(len(counts)), -counts))
    top = order[: int(n_unigrams)]
    top = top[counts[top] > 0]
    classes = token_classes(texts, special_ids)
    rows: list[dict] = []
    groups: dict[str, tuple[list[int], list]] = {}

    def add(group: str, member, **row) -> None:
        g = groups.setdefault(group, ([], []))
        g[0].append(len(rows))
        g[1].append(member)
        rows.append({"feature": len(rows), "token_id": -1, **row})

    for side, tag in (("current", "cur"), ("previous", "prev")):
        groups.setdefault(f"{side}:unigram", ([], []))
        groups.setdefault(f"{side}:sets", ([], []))
        for i in top:
            add(f"{side}:unigram", int(i), key=f"{tag}:id:{int(i)}", name=f"{side} token {texts[i]!r}",
                kind="unigram", side=side, token_id=int(i), definition=f"the {side} token is id {int(i)}")
        for cname, member in classes.items():
            kind = "alphabet" if cname.startswith("letter_") else "class"
            if side == "previous" and cname in ("special", "newline"):
                seq = "start_of_document" if cname == "special" else "after_newline"
                add(f"{side}:sets", member, key=f"seq:{seq}", name=seq.replace("_", " "), kind="sequence",
                    side=side, definition=_SEQUENCE[seq])
                continue
            add(f"{side}:sets", member, key=f"{tag}:class:{cname}", name=f"{side} token {cname.replace('_', ' ')}",
                kind=kind, side=side, definition=f"the {side} token: {CLASS_DEFINITIONS[cname]}")
    groups.setdefault("position", ([], []))
    for lo, hi in zip(edges, edges[1:]):
        label = f"{lo}" if hi == lo + 1 else f"{lo}-{hi - 1}"
        add("position", (int(lo), int(hi)), key=f"pos:{label}", name=f"position {label}", kind="position",
            side="position", definition=f"the token's position in its row is in [{lo}, {hi})")
    table = pd.DataFrame(rows, columns=["feature", "key", "name", "kind", "side", "token_id", "definition"])
    fs = FeatureSet(table=table, unigram_ids=np.asarray(top, np.int64), classes=classes, edges=list(edges))
    for g, (r, members) in groups.items():
        if g.endswith(":sets"):
            mat = np.stack(members, axis=1) if members else np.zeros((len(texts), 0), bool)
            fs._groups[g] = (np.asarray(r, np.int64), mat)
        else:
            fs._groups[g] = (np.asarray(r, np.int64), np.asarray(members))
    return fs
