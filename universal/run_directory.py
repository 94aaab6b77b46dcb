"""A pipeline run's output directory as one whole: what defines the run (its identity, kept in
`summary.json`), the refusal of a directory that holds another run, and `overwrite` replacing
every output of the earlier run at once.

    identity = run_identity(models, text, checkpoint=..., labels=..., config=...)
    check_same_run(out, identity, overwrite=False)    # before any work: another run here -> OutputExistsError
    with replacing_run(out, overwrite=True):          # the earlier run moved aside, deleted on success,
        ...                                           # put back if this run fails

Why the whole directory: the stages' files derive from one another (the report and the
properties from the table, the table from the correlation and the threshold). A run that
rewrote some of them next to the others' old versions would leave a directory that
contradicts itself, so a directory holds one run, and `overwrite` replaces all of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Sequence

from universal_neurons.activations import TokenSet
from universal_neurons.artifacts import OVERWRITE_HINT, plain, read_json
from universal_neurons.errors import OutputExistsError

__all__ = ["RUN_FILES", "RUN_FOLDERS", "RUN_OUTPUTS", "ASIDE", "run_identity", "run_differences", "check_same_run",
           "replacing_run"]

log = logging.getLogger(__name__)

# Every name a run (its first stages, the later stages, persistence's runs) writes in its directory;
# a table's provenance side file `<name>.json` (universality.csv.json, properties.csv.json) goes with it.
RUN_FILES = ("tokens.h5", "tokens_held_out.h5", "correlation.h5", "universality.csv", "universality.h5", "summary.json",
             "properties.csv", "property_comparison.csv", "report.html")
RUN_FOLDERS = ("stores", "ablation", "persistence", "checkpoints", "agreement", "explanations")
RUN_OUTPUTS = (*RUN_FILES, *(f"{name}.json" for name in RUN_FILES if not name.endswith(".json")), *RUN_FOLDERS)
ASIDE = ".replaced-run"  # where `overwrite` keeps the earlier run until the new one has finished
# where a run computes, not what it computes: a run may move to another device or cluster and reuse its results
PLACEMENT = ("config.device", "config.cluster", "config.correlation.device")


def _model_id(model: str | os.PathLike) -> str:
    """A model as named: a directory by its absolute path (named relatively or not), a hub name as given."""
    path = Path(model)
    try:
        exists = path.exists()
    except (OSError, ValueError):  # not a path at all: text, or a name too long for one
        exists = False
    return str(path.resolve()) if exists else os.fspath(model)


def _text_id(text: Any) -> dict[str, Any]:
    """What text a run read: a token set by its hash, a file, folder or `hf:` source by its name,
    a list of strings (or paths) by a hash of them."""
    if isinstance(text, TokenSet):
        return {"token_set": text.hash}
    if isinstance(text, (str, os.PathLike)):
        return {"source": _model_id(text)}
    if isinstance(text, (list, tuple)):
        digest = hashlib.sha256()
        for item in text:
            digest.update(_model_id(item).encode("utf-8", "surrogatepass") + b"\0")
        return {"texts": len(text), "sha256": digest.hexdigest()}
    return {"kind": type(text).__name__}  # an iterator: reading it here would consume it


def run_identity(models: Sequence[str | os.PathLike], text: Any, *, checkpoint: int | None, labels: Sequence[str],
                 config: Any) -> dict[str, Any]:
    """Everything that defines a run, as `summary.json` keeps it under `"run"`.

    Args:
        models: the models as named (hub names, directories).
        text: what the run tokenises (`run_pipeline`'s `text`), or a `TokenSet`.
        checkpoint: the training step loaded for every model.
        labels: the models' short names.
        config: the `PipelineConfig`.

    Returns:
        `{models, checkpoint, labels, text, config}`, JSON-plain.
    """
    return plain({"models": [_model_id(m) for m in models], "checkpoint": checkpoint, "labels": list(labels),
                  "text": _text_id(text), "config": config.to_dict()})


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: obj}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ignored(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def run_differences(earlier: dict[str, Any], identity: dict[str, Any], *, studied: str | None = None) -> list[str]:
    """What differs between an earlier run's identity and this one's, one `key: old -> new` each.

    Keys the earlier identity lacks altogether (a summary written before they were recorded)
    are not compared; where the run computes (`PLACEMENT`) never is. A run given a token set is
    defined by it, not by how text would be tokenised: its hash is compared with the one the
    earlier run studied (`studied`), and the tokenising settings are not. A run given text after
    one given a token set is compared once tokenised (the token set stage refuses another one).

    Args:
        earlier: the `"run"` record of the earlier run's summary.
        identity: `run_identity(...)` of this run.
        studied: the hash of the token set the earlier run studied.

    Returns:
        One line per difference, sorted by key.
    """
    old, new = dict(earlier), dict(identity)
    ignore: list[str] = list(PLACEMENT)
    tokenising = ["config.tokens", "config.held_out_share", "config.held_out_tokens"]
    if "token_set" in (new.get("text") or {}):
        ignore += tokenising
        old["text"] = {"token_set": studied} if studied else old.get("text")
    elif "token_set" in (old.get("text") or {}):  # the earlier run's tokenising settings were not used
        ignore += [*tokenising, "text"]
    flat_old, flat_new = _flat(old), _flat(new)
    known = {k.split(".", 1)[0] for k in flat_old}
    keys = sorted(k for k in set(flat_old) | set(flat_new) if not _ignored(k, ignore))
    return [f"{k}: {_short(flat_old.get(k))} -> {_short(flat_new.get(k))}" for k in keys
            if k.split(".", 1)[0] in known and flat_old.get(k) != flat_new.get(k)]


def check_same_run(out: str | os.PathLike, identity: dict[str, Any], *, overwrite: bool) -> None:
    """Refuse, before any work, a directory whose `summary.json` records another run.

    The same run is let through (each stage then reuses or refuses its own outputs); with
    `overwrite` nothing is compared (`replacing_run` replaces the earlier run).

    Args:
        out: the run directory.
        identity: `run_identity(...)` of this run.
        overwrite: the caller asked to replace an earlier run.

    Raises:
        OutputExistsError: the directory holds a run of other models, text, checkpoint, labels
            or settings, naming what differs.
        InputError: its `summary.json` cannot be read.
    """
    path = Path(out) / "summary.json"
    if overwrite or not path.exists():
        return
    summary = read_json(path, what="run summary")
    if not isinstance(summary, dict):
        summary = {}
    inputs = summary.get("inputs") or {}
    earlier = summary.get("run")
    if earlier is None:  # written before runs recorded their identity: what it does record
        earlier = {"config": summary.get("config"), "labels": inputs.get("labels")}
    diffs = run_differences(earlier, identity, studied=(inputs.get("token_set") or {}).get("hash"))
    if diffs:
        more = f"; and {len(diffs) - 4} more" if len(diffs) > 4 else ""
        raise OutputExistsError(f"{out} holds a run made from other models, tokens or settings ({'; '.join(diffs[:4])}"
                                f"{more}); {OVERWRITE_HINT.replace('replace it', 'replace the whole run')}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@contextlib.contextmanager
def replacing_run(out: str | os.PathLike, *, overwrite: bool) -> Iterator[list[str]]:
    """With `overwrite`, replace the earlier run in `out` as a whole, never in part.

    On entry every output of an earlier run (`RUN_OUTPUTS`) is moved aside into `out/ASIDE`
    (renames, nothing copied). When the block succeeds they are deleted, so no file of the
    earlier run (a report, properties, ablation, ...) survives next to the new results, even
    from a stage this run skips. When it fails or is interrupted, what this run wrote under
    those names is deleted and the earlier run is put back as it was. Without `overwrite`
    nothing is moved.

    Args:
        out: the run directory.
        overwrite: replace the earlier run.

    Yields:
        The names moved aside (empty without `overwrite` or an earlier run).
    """
    out = Path(out)
    aside = out / ASIDE
    if not overwrite:
        if aside.exists():
            log.warning("%s holds an earlier run that an interrupted overwrite moved aside; move its files back to "
                        "restore that run, or delete it", aside)
        yield []
        return
    if aside.exists():  # left by an overwrite that was killed: this overwrite replaces that run too
        log.warning("removing %s, an earlier run left by an interrupted overwrite", aside)
        shutil.rmtree(aside)
    present = [name for name in RUN_OUTPUTS if os.path.lexists(out / name)]
    if not present:
        yield []
        return
    aside.mkdir()
    for name in present:
        os.replace(out / name, aside / name)
    log.info("overwrite: the earlier run (%s) is moved aside to %s until this run has finished", ", ".join(present),
             aside)
    try:
        yield present
    except BaseException:
        for name in RUN_OUTPUTS:  # this run's partial outputs
            _remove(out / name)
        for name in present:
            os.replace(aside / name, out / name)
        aside.rmdir()
        log.warning("the run did not finish; the earlier run in %s is back as it was", out)
        raise
    shutil.rmtree(aside)
    log.info("overwrite: removed the earlier run's %s (replaced by this run's, or not made by it)", ", ".join(present))
