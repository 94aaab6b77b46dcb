"""Models in: the one module that touches TransformerLens loading.

Everything else in the toolkit receives a `LoadedModel` from here (hook names and forward
passes: `hooks.py`; making and saving models: `architecture.py`). A model spec is one of

- a TransformerLens / Hugging Face hub name (`stanford-gpt2-small-a`, `pythia-160m-seed1`,
  `EleutherAI/pythia-160m`, `gpt2`), optionally at a training `checkpoint` step: the hub
  revision `checkpoint-{step}` for the Stanford CRFM seeds, `step{step}` for Pythia;
- a local model directory as `save_pretrained` writes it (config, weights, tokenizer),
  including the ones this toolkit saves for its own trained seed families;
- a local family directory holding `checkpoint-{step}` sub-directories, loaded at
  `checkpoint=step` exactly like a hub model at a checkpoint.

`check_available` says, in milliseconds and with no download, whether a spec can be loaded
here; stages that load several models check every one of them before loading the first.
Local directories load with no network at all; hub weights load from the local Hugging Face
cache when they are there (`HF_HUB_OFFLINE=1` then suffices), else from the hub.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from universal_neurons.errors import (
    ConfigError,
    InputError,
    InputNotFoundError,
    ModelUnavailableError,
)
from universal_neurons.runtime import hub_reachable, package_versions, pick_device

from .architecture import TRAINING_RECORD, checkpoint_dir, list_checkpoints

__all__ = [
    "LoadedModel",
    "ModelLocation",
    "check_available",
    "load_model",
    "load_from_provenance",
    "hub_name",
]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A model directory (or hub snapshot) is complete with a config, one of these weight files
# (an index names its shards, which must be there too) and one of these tokenizer vocabularies
# (tokenizer_config.json alone builds no tokenizer).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")

# The hub's revision naming of training checkpoints, per repository prefix (as TransformerLens
# resolves `checkpoint_value`).
_CHECKPOINT_REVISIONS = {"stanford-crfm/": "checkpoint-{step}", "EleutherAI/pythia": "step{step}"}


@dataclass
class LoadedModel:
    """A model ready to run, with everything needed to reproduce how it was loaded.

    Attributes:
        model: the TransformerLens `TransformerBridge`.
        tokenizer: its Hugging Face tokenizer (never empty; checked on load).
        provenance: name, checkpoint, weight processing, shapes, dtype, versions.
    """

    model: Any
    tokenizer: Any
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_mlp(self) -> int:
        return int(self.model.cfg.d_mlp)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.model.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.model.cfg.n_ctx)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return str(self.provenance.get("name"))


@dataclass(frozen=True)
class ModelLocation:
    """Where a model spec's weights are, as `check_available` found them.

    Attributes:
        spec: the name or directory as given.
        source: `"local"` or `"hub"`.
        resolved: the model directory (the checkpoint's sub-directory included), or the
            canonical hub repository (`stanford-crfm/alias-gpt2-small-x21`).
        checkpoint: the training step asked for, or None (final weights).
        revision: the hub revision of that step (`checkpoint-400000`, `step1000`); None for
            a local directory or the default branch.
    """

    spec: str
    source: str
    resolved: str
    checkpoint: int | None = None
    revision: str | None = None


# ---------------------------------------------------------------------------- availability


def check_available(spec: str | os.PathLike, checkpoint: int | None = None) -> ModelLocation:
    """Refuse, before any work, a model (or checkpoint) that cannot be loaded here.

    Reads file listings only: nothing is loaded or downloaded. A local directory must exist,
    hold the checkpoint's `checkpoint-{step}/` sub-directory when a step is named, and hold
    a config, weights and tokenizer files. A hub name must resolve to a repository (aliases
    such as `stanford-gpt2-small-a` through TransformerLens' registry), a step must be one
    of its family's published checkpoints, and its config, weights and tokenizer at that
    revision must be in the local Hugging Face cache, or else the hub must be reachable and
    have them.

    Args:
        spec: hub name or local directory.
        checkpoint: training step, or None for the final weights.

    Returns:
        Where the weights are (`ModelLocation`); `load_model` loads from there.

    Raises:
        InputNotFoundError: a local directory or checkpoint sub-directory that does not exist.
        InputError: a local directory without weights or tokenizer files.
        ConfigError: a checkpoint the hub family does not publish, or a checkpoint for a hub
            model without published checkpoints.
        ModelUnavailableError: hub files neither cached nor reachable, or not on the hub.
    """
    spec_str = os.fspath(spec)
    local = Path(spec_str).expanduser()
    if local.exists():
        path = _resolve_local(local, checkpoint)
        _check_model_files(path)
        return ModelLocation(spec_str, "local", str(path.resolve()), checkpoint, None)
    if _looks_like_path(spec_str):
        raise InputNotFoundError(
            f"model directory {spec_str} does not exist; pass an existing model directory (what `save_pretrained` "
            "writes) or a hub name such as stanford-gpt2-small-a")
    repo = hub_name(spec_str)
    revision = _hub_revision(repo, checkpoint)
    missing = _not_cached(spec_str, repo, revision)
    if missing:
        if not hub_reachable():
            _refuse_uncached(spec_str, repo, revision, missing)
        _check_on_hub(spec_str, repo, revision)
    return ModelLocation(spec_str, "hub", repo, checkpoint, revision)


def hub_name(spec: str) -> str:
    """The canonical hub repository of a name: TransformerLens aliases resolved
    (`stanford-gpt2-small-a` -> `stanford-crfm/alias-gpt2-small-x21`), other names unchanged."""
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    return resolve_model_alias(spec) or spec


def _looks_like_path(spec: str) -> bool:
    """A spec meant as a directory: `./x`, `~/x`, `/x`, `a/b/c` (a hub name has at most one `/`)."""
    return spec.startswith((".", "~", os.sep)) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)


def _resolve_local(path: Path, checkpoint: int | None) -> Path:
    if checkpoint is not None:
        sub = checkpoint_dir(path, checkpoint)
        if not sub.is_dir():
            have = list_checkpoints(path)
            raise InputNotFoundError(
                f"{path} has no checkpoint {checkpoint}; it has {have or 'none'}. "
                "Pass one of those steps, or omit the checkpoint to load the final weights."
            )
        path = sub
    if not (path / "config.json").exists():
        have = list_checkpoints(path)
        if have:  # a seed directory of checkpoints: its final weights are the last step
            return checkpoint_dir(path, have[-1])
        raise InputError(
            f"{path} is not a model directory (no config.json, no checkpoint-<step>/). A model directory is what "
            "`save_pretrained` writes: config.json, weights and tokenizer files."
        )
    return path


def _check_model_files(path: Path) -> None:
    """Refuse a local model directory without weights (or their shards) or tokenizer files."""
    weights = next((w for w in WEIGHT_FILES if (path / w).is_file()), None)
    if weights is None:
        raise InputError(
            f"{path} has a config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); save the model with "
            "`model.save_pretrained(dir)`, or copy its weight files there")
    lacking = [s for s in _shards(path / weights) if not (path / s).is_file()]
    if lacking:
        raise InputError(f"{path} lacks weight shard(s) {', '.join(lacking)} named by {weights}; copy the whole "
                         "model directory")
    if not any((path / n).exists() for n in TOKENIZER_FILES):
        raise InputError(
            f"{path} has weights but no tokenizer files; TransformerLens would load an empty "
            "tokenizer. Save the tokenizer next to the weights (`tokenizer.save_pretrained(dir)`)."
        )


def _shards(weights: Path) -> list[str]:
    """The shard files a weight index (`*.index.json`) names; none for a single weight file."""
    if not weights.name.endswith(".index.json"):
        return []
    try:
        return sorted(set(json.loads(weights.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise InputError(f"{weights} is not a readable weight index ({e}); download the model again") from e


def _hub_revision(repo: str, checkpoint: int | None) -> str | None:
    """The hub revision of a training step, checked against the family's published steps."""
    if checkpoint is None:
        return None
    fmt = next((f for prefix, f in _CHECKPOINT_REVISIONS.items() if repo.startswith(prefix)), None)
    if fmt is None:
        raise ConfigError(
            f"{repo} has no training checkpoints this toolkit knows how to name (hub families with checkpoints: "
            "the Stanford CRFM GPT-2 seeds, Pythia); omit the checkpoint to load its final weights, or pass a "
            "local seed directory holding checkpoint-<step>/ sub-directories")
    from transformer_lens.tools.model_registry.checkpoints import get_checkpoint_labels

    steps, _ = get_checkpoint_labels(repo)
    if int(checkpoint) not in steps:
        nearest = sorted(sorted(steps, key=lambda s: (abs(s - int(checkpoint)), s))[:2])
        raise ConfigError(
            f"{repo} has no checkpoint {checkpoint}: its {len(steps)} published steps run from {steps[0]} to "
            f"{steps[-1]}; the nearest are {' and '.join(map(str, nearest))}. Pass one of its steps.")
    return fmt.format(step=int(checkpoint))


def _not_cached(spec: str, repo: str, revision: str | None) -> list[str]:
    """What of a hub model at `revision` the local Hugging Face cache lacks (empty: all there)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    def cached(filename: str) -> str | None:
        found = try_to_load_from_cache(repo, filename, revision=revision)
        return found if isinstance(found, str) else None

    try:
        missing = [] if cached("config.json") else ["config.json"]
        weights = next((w for w in WEIGHT_FILES if cached(w)), None)
        if weights is None:
            missing.append("weights")
        else:
            missing += [s for s in _shards(Path(str(cached(weights)))) if not cached(s)]
        if not any(cached(t) for t in TOKENIZER_FILES):
            missing.append("tokenizer files")
    except HFValidationError as e:
        raise ConfigError(f"{spec!r} is neither an existing directory nor a valid hub name ({e}); pass a model "
                          "directory, or a hub name such as stanford-gpt2-small-a or EleutherAI/pythia-160m") from e
    return missing


def _at(repo: str, revision: str | None) -> str:
    return f"{repo} at revision {revision}" if revision else repo


def _refuse_uncached(spec: str, repo: str, revision: str | None, missing: list[str]) -> None:
    from huggingface_hub import constants

    rev = f" --revision {revision}" if revision else ""
    raise ModelUnavailableError(
        f"model {spec!r}: the local Hugging Face cache ({constants.HF_HUB_CACHE}) lacks the {', '.join(missing)} "
        f"of {_at(repo, revision)}, and the hub cannot be reached from this machine. On a machine with network "
        f"run `hf download {repo}{rev}` (`huggingface-cli download` in older "
        "huggingface_hub versions) and copy the cache here (set HF_HUB_CACHE or HF_HOME to where it is), or pass "
        "a local model directory instead of a hub name.")


def _check_on_hub(spec: str, repo: str, revision: str | None) -> None:
    """Refuse a repository or revision the (reachable) hub does not have; a failed check is
    left to the download to report."""
    from huggingface_hub import file_exists
    from huggingface_hub.errors import GatedRepoError

    try:
        found = file_exists(repo, "config.json", revision=revision)
    except GatedRepoError as e:
        raise ModelUnavailableError(
            f"model {spec!r}: {repo} is gated on the hub; accept its terms on huggingface.co and log in "
            "(`hf auth login`, or set HF_TOKEN)") from e
    except Exception as e:  # noqa: BLE001 - a flaky connection must not block a load that may work
        log.warning("could not check %s on the hub (%s); loading will tell", _at(repo, revision), e)
        return
    if not found:
        raise ModelUnavailableError(
            f"model {spec!r}: the hub has no {_at(repo, revision)} (no such repository or revision, or it is "
            "private). Check the name: a TransformerLens alias (stanford-gpt2-small-a .. -e, pythia-160m-seed1) "
            "or a hub repository owner/name; and the checkpoint step.")


# ---------------------------------------------------------------------------- loading


def load_model(
    spec: str | os.PathLike,
    *,
    checkpoint: int | None = None,
    device: str | None = None,
    dtype: str = "float32",
    process_weights: bool = True,
) -> LoadedModel:
    """Load a model by hub name or local directory, with its provenance.

    Args:
        spec: hub name (`stanford-gpt2-small-a`, `EleutherAI/pythia-160m`) or local directory.
        checkpoint: training step (hub: TransformerLens `checkpoint_value`, i.e. revision
            `checkpoint-{step}` for the Stanford seeds and `step{step}` for Pythia; local:
            sub-directory `checkpoint-{step}`).
        device: `None`/`'auto'` picks CUDA when present, else CPU.
        dtype: `float32` (default), `bfloat16` or `float16`.
        process_weights: apply the paper's (HookedTransformer's) weight processing on load:
            fold LayerNorm, centre writing weights, centre the unembedding. Neuron activations are
            unchanged by it; weight statistics (norms, vocab composition) depend on it
            (docs/method.md §1).

    Returns:
        a `LoadedModel`; its provenance records the name, the canonical repository or
        directory (`resolved`), the checkpoint and the hub revision.

    Raises:
        UniversalNeuronsError: what `check_available` refuses; an unknown dtype; a model that
            loads with an empty tokenizer.
        ModelUnavailableError: hub files that fail to load.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    dev = pick_device(device)
    where = check_available(spec, checkpoint)
    record: dict[str, Any] = {}
    if where.source == "local":
        path = Path(where.resolved)
        if (path / TRAINING_RECORD).exists():
            record = json.loads((path / TRAINING_RECORD).read_text())
        with _offline():
            bridge = TransformerBridge.boot_transformers(str(path), device=dev, dtype=_DTYPES[dtype])
    else:
        kwargs: dict[str, Any] = {"device": dev, "dtype": _DTYPES[dtype]}
        if checkpoint is not None:
            kwargs["checkpoint_value"] = int(checkpoint)
        try:
            bridge = TransformerBridge.boot_transformers(where.resolved, **kwargs)
        except (ValueError, KeyError, OSError) as e:
            raise ModelUnavailableError(
                f"could not load {where.spec!r} ({_at(where.resolved, where.revision)}): {e}") from e
    bridge.eval()
    processing = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}
    if process_weights:
        bridge.enable_compatibility_mode(disable_warnings=True)
        processing = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}
    tokenizer = bridge.tokenizer
    if tokenizer is None or len(tokenizer("Hello world")["input_ids"]) == 0:
        raise InputError(
            f"{where.spec} loaded with an empty tokenizer. Save the tokenizer next to the weights "
            "(`tokenizer.save_pretrained(dir)`)."
        )
    cfg = bridge.cfg
    provenance = {
        "name": where.spec if where.source == "hub" else (record.get("name") or Path(where.spec).expanduser().name),
        "source": where.source,
        "resolved": where.resolved,
        "checkpoint": None if checkpoint is None else int(checkpoint),
        "revision": where.revision,
        "weight_processing": processing,
        "n_layers": int(cfg.n_layers),
        "d_model": int(cfg.d_model),
        "d_mlp": int(cfg.d_mlp or 4 * cfg.d_model),  # TransformerLens' default when a config leaves it unset
        "d_vocab": int(cfg.d_vocab),
        "n_ctx": int(cfg.n_ctx),
        "act_fn": getattr(cfg, "act_fn", None),
        "dtype": dtype,
        "device": str(dev),
        "training_record": record or None,
        "versions": package_versions(),
    }
    return LoadedModel(model=bridge, tokenizer=tokenizer, provenance=provenance)


def load_from_provenance(provenance: dict[str, Any], *, device: str | None = None,
                         process_weights: bool | None = None, dtype: str | None = None) -> LoadedModel:
    """Load the model a result's provenance names, exactly as it was loaded then.

    A local model is loaded from `resolved` (already the checkpoint directory); a hub model
    from its canonical repository `resolved` at the recorded `checkpoint`.

    Args:
        provenance: `LoadedModel.provenance` as saved in any artefact.
        device: where to load it; `None` picks CUDA when present.
        process_weights: `None` repeats the recorded weight processing.
        dtype: `None` repeats the recorded dtype.

    Returns:
        The `LoadedModel`.
    """
    if process_weights is None:
        process_weights = bool((provenance.get("weight_processing") or {}).get("fold_ln", True))
    local = provenance.get("source") == "local"
    return load_model(provenance["resolved"], checkpoint=None if local else provenance.get("checkpoint"),
                      device=device, dtype=dtype or provenance.get("dtype") or "float32",
                      process_weights=process_weights)


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Local directories must never touch the network."""
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
