"""Models in: the one module that touches TransformerLens loading and hook naming.

Everything else in the toolkit receives a `LoadedModel` and hook names from here.
A model spec is one of

- a TransformerLens / Hugging Face hub name (`stanford-gpt2-small-a`, `pythia-160m-seed1`,
  `gpt2`), optionally at a training `checkpoint` step;
- a local model directory as `save_pretrained` writes it (config, weights, tokenizer),
  including the ones this toolkit saves for its own trained seed families;
- a local family directory holding `checkpoint-{step}` sub-directories, loaded at
  `checkpoint=step` exactly like a hub model at a checkpoint.

Local directories load with no network at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from universal_neurons.errors import IncompatibleInputsError, UniversalNeuronsError
from universal_neurons.runtime import hub_reachable, package_versions, pick_device

__all__ = [
    "LoadedModel",
    "GPT2Config",
    "load_model",
    "load_from_provenance",
    "hook_name",
    "parse_hook_name",
    "check_hook_names",
    "mlp_activations",
    "mlp_weights",
    "run_with_post_hooks",
    "init_gpt2",
    "save_model_dir",
    "checkpoint_dir",
    "list_checkpoints",
]

log = logging.getLogger(__name__)

HookKind = str  # "post" (after the nonlinearity) or "pre"; checked where a hook name is made

TRAINING_RECORD = "universal_neurons.json"  # written next to the weights of toolkit-trained models

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# ---------------------------------------------------------------------------- hook names


def hook_name(layer: int, kind: HookKind = "post") -> str:
    """`blocks.{layer}.mlp.hook_{kind}`: the activation after (`post`) or before (`pre`)
    the MLP nonlinearity."""
    if kind not in ("post", "pre"):
        raise UniversalNeuronsError(f"unknown hook kind {kind!r}; use 'post' or 'pre'")
    return f"blocks.{int(layer)}.mlp.hook_{kind}"


def parse_hook_name(name: str) -> tuple[int, HookKind]:
    """Inverse of `hook_name`: `'blocks.3.mlp.hook_post'` -> `(3, 'post')`."""
    parts = name.split(".")
    if len(parts) != 4 or parts[0] != "blocks" or parts[2] != "mlp" or parts[3] not in ("hook_post", "hook_pre"):
        raise UniversalNeuronsError(
            f"{name!r} is not an MLP neuron hook; expected 'blocks.<layer>.mlp.hook_post' or '...hook_pre'"
        )
    return int(parts[1]), parts[3][len("hook_"):]


def check_hook_names(lm: LoadedModel, names: Sequence[str]) -> None:
    """Refuse hook names the model does not have, before a forward pass.

    A name that attaches to nothing must never run as an unhooked pass (an ablation would
    read as a change of 0). Checked against the bridge's `hook_dict`, aliases included: with
    `process_weights=False` `blocks.{l}.mlp.hook_post` is an alias of `blocks.{l}.mlp.out.hook_in`.

    Raises:
        IncompatibleInputsError: a name the model's `hook_dict` lacks.
    """
    have = lm.model.hook_dict
    missing = sorted({n for n in names if n not in have})
    if missing:
        raise IncompatibleInputsError(
            f"{lm.name} has no hook point {', '.join(missing)}; it would attach to nothing and leave the forward "
            f"pass unchanged. Its MLP neurons are hooked at {hook_name(0)} .. {hook_name(lm.n_layers - 1)}; a model "
            "whose bridge names them otherwise is not supported")


def _check_fired(lm: LoadedModel, wanted: set[str], fired: set[str]) -> None:
    """Refuse a pass in which a hook that attached never ran (its output would be unhooked)."""
    if wanted - fired:
        raise IncompatibleInputsError(
            f"the hook(s) {', '.join(sorted(wanted - fired))} attached to {lm.name} but never ran in the forward "
            "pass, so nothing was read or written there; this TransformerLens version does not fire them")


# ---------------------------------------------------------------------------- loading


def checkpoint_dir(family_dir: str | os.PathLike, step: int) -> Path:
    """Where a locally trained seed keeps checkpoint `step` (mirrors the hub's `checkpoint-{step}`)."""
    return Path(family_dir) / f"checkpoint-{int(step)}"


def list_checkpoints(model_dir: str | os.PathLike) -> list[int]:
    """Checkpoint steps saved under a local model directory, ascending."""
    steps = []
    for p in Path(model_dir).glob("checkpoint-*"):
        suffix = p.name[len("checkpoint-"):]
        if suffix.isdigit() and (p / "config.json").exists():
            steps.append(int(suffix))
    return sorted(steps)


def _resolve_local(path: Path, checkpoint: int | None) -> Path:
    if checkpoint is not None:
        sub = checkpoint_dir(path, checkpoint)
        if not sub.is_dir():
            have = list_checkpoints(path)
            raise UniversalNeuronsError(
                f"{path} has no checkpoint {checkpoint}; it has {have or 'none'}. "
                "Pass one of those steps, or omit the checkpoint to load the final weights."
            )
        path = sub
    if not (path / "config.json").exists():
        have = list_checkpoints(path)
        if have:  # a seed directory of checkpoints: its final weights are the last step
            return checkpoint_dir(path, have[-1])
        raise UniversalNeuronsError(
            f"{path} is not a model directory (no config.json, no checkpoint-<step>/). A model directory is what "
            "`save_pretrained` writes: config.json, weights and tokenizer files."
        )
    return path


def _hub_name(spec: str) -> str:
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    return resolve_model_alias(spec) or spec


def _check_hub_reachable(repo: str, revision: str | None) -> None:
    """Fail fast, with the fix, when hub weights are neither cached nor downloadable."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
        return
    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return
    if not hub_reachable():
        rev = f" --revision {revision}" if revision else ""
        raise UniversalNeuronsError(
            f"the weights of {repo}{' at ' + revision if revision else ''} are not in the local "
            "Hugging Face cache and the hub cannot be reached from this machine. On a machine "
            f"with network run `huggingface-cli download {repo}{rev}` (then copy the cache), or "
            "pass a local model directory instead of a hub name."
        )


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
            `checkpoint-{step}` for the Stanford seeds; local: sub-directory `checkpoint-{step}`).
        device: `None`/`'auto'` picks CUDA when present, else CPU.
        dtype: `float32` (default), `bfloat16` or `float16`.
        process_weights: apply the paper's (HookedTransformer's) weight processing on load:
            fold LayerNorm, centre writing weights, centre the unembedding. Neuron activations are
            unchanged by it; weight statistics (norms, vocab composition) depend on it.

    Returns:
        a `LoadedModel`.
    """
    from transformer_lens.model_bridge import TransformerBridge

    if dtype not in _DTYPES:
        raise UniversalNeuronsError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    dev = pick_device(device)
    spec_str = os.fspath(spec)
    local = Path(spec_str).expanduser()
    record: dict[str, Any] = {}
    if local.exists():
        path = _resolve_local(local, checkpoint)
        source = "local"
        resolved = str(path.resolve())
        rec_file = path / TRAINING_RECORD
        if rec_file.exists():
            record = json.loads(rec_file.read_text())
        _check_tokenizer_files(path)
        with _offline():
            bridge = TransformerBridge.boot_transformers(str(path), device=dev, dtype=_DTYPES[dtype])
        revision = None
    else:
        if os.sep in spec_str and not spec_str.count("/") == 1:
            raise UniversalNeuronsError(f"model directory {spec_str} does not exist")
        source = "hub"
        resolved = _hub_name(spec_str)
        revision = _hub_revision(resolved, checkpoint)
        _check_hub_reachable(resolved, revision)
        kwargs: dict[str, Any] = {"device": dev, "dtype": _DTYPES[dtype]}
        if checkpoint is not None:
            kwargs["checkpoint_value"] = int(checkpoint)
        try:
            bridge = TransformerBridge.boot_transformers(resolved, **kwargs)
        except (ValueError, KeyError) as e:
            raise UniversalNeuronsError(f"could not load {spec_str!r} at checkpoint {checkpoint}: {e}") from e
    bridge.eval()
    processing = {"fold_ln": False, "center_writing_weights": False, "center_unembed": False}
    if process_weights:
        bridge.enable_compatibility_mode(disable_warnings=True)
        processing = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True}
    tokenizer = bridge.tokenizer
    if tokenizer is None or len(tokenizer("Hello world")["input_ids"]) == 0:
        raise UniversalNeuronsError(
            f"{spec_str} loaded with an empty tokenizer. Save the tokenizer next to the weights "
            "(`tokenizer.save_pretrained(dir)`)."
        )
    cfg = bridge.cfg
    provenance = {
        "name": spec_str if source == "hub" else (record.get("name") or local.name),
        "source": source,
        "resolved": resolved,
        "checkpoint": None if checkpoint is None else int(checkpoint),
        "revision": revision,
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


def _hub_revision(repo: str, checkpoint: int | None) -> str | None:
    if checkpoint is None:
        return None
    if repo.startswith("stanford-crfm/"):
        return f"checkpoint-{int(checkpoint)}"
    if repo.startswith("EleutherAI/pythia"):
        return f"step{int(checkpoint)}"
    return None


def _check_tokenizer_files(path: Path) -> None:
    names = {"tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json"}
    if not any((path / n).exists() for n in names):
        raise UniversalNeuronsError(
            f"{path} has weights but no tokenizer files; TransformerLens would load an empty "
            "tokenizer. Save the tokenizer next to the weights (`tokenizer.save_pretrained(dir)`)."
        )


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


# ---------------------------------------------------------------------------- running


class _StopForward(Exception):
    """Raised by the last needed hook: the rest of the forward pass (and the unembedding)
    is skipped. Private so a user's exception is never swallowed."""


def _check_layers(lm: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    if layers is None:
        return list(range(lm.n_layers))
    out = [int(layer) for layer in layers]
    bad = [layer for layer in out if not 0 <= layer < lm.n_layers]
    if bad:
        raise UniversalNeuronsError(
            f"layer(s) {bad} do not exist in {lm.name}, which has layers 0..{lm.n_layers - 1}"
        )
    return sorted(set(out))


@torch.inference_mode()
def mlp_activations(
    lm: LoadedModel,
    tokens: torch.Tensor,
    *,
    kinds: Sequence[HookKind] = ("post",),
    layers: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """MLP neuron activations for a batch of token rows, skipping everything after the
    last requested layer (no unembedding), without gradients.

    Args:
        tokens: `Int[Tensor, "batch pos"]`.
        kinds: `'post'` (after the nonlinearity) and/or `'pre'`.
        layers: which layers (default all).

    Returns:
        `{hook_name: Float[Tensor, "batch pos d_mlp"]}` on the model's device.
    """
    layers = _check_layers(lm, layers)
    wanted = {hook_name(layer, k) for layer in layers for k in kinds}
    check_hook_names(lm, sorted(wanted))
    out: dict[str, torch.Tensor] = {}

    def make_hook(name: str) -> Callable:
        def fn(act, hook):  # noqa: ARG001 - TransformerLens hook signature
            out[name] = act.detach()
            if len(out) == len(wanted):
                raise _StopForward
            return act

        return fn

    fwd = [(n, make_hook(n)) for n in sorted(wanted)]
    if tokens.device != lm.device:
        tokens = tokens.to(lm.device)
    try:
        with lm.model.hooks(fwd_hooks=fwd):
            lm.model(tokens, return_type=None)
    except _StopForward:
        pass
    _check_fired(lm, wanted, set(out))
    return {n: out[n] for n in sorted(wanted, key=lambda n: parse_hook_name(n))}


def run_with_post_hooks(
    lm: LoadedModel,
    tokens: torch.Tensor,
    post_hooks: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Logits of a forward pass with functions applied to `blocks.{l}.mlp.hook_post`.

    Hooks are scoped: they are removed when the pass ends, also after an error. Every hook
    name is checked against the model before the pass, and every hook must have run after it.

    Args:
        tokens: `Int[Tensor, "batch pos"]`.
        post_hooks: `{layer: f}` with `f(act: Float[Tensor, "batch pos d_mlp"]) -> same shape`.

    Returns:
        `Float[Tensor, "batch pos d_vocab"]`.

    Raises:
        UniversalNeuronsError: a layer the model does not have.
        IncompatibleInputsError: a hook name the model lacks, or a hook that never ran.
    """
    post_hooks = post_hooks or {}
    _check_layers(lm, list(post_hooks))
    names = {layer: hook_name(layer, "post") for layer in post_hooks}
    check_hook_names(lm, list(names.values()))
    fired: set[str] = set()

    def wrap(name: str, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
        def fn(act, hook):  # noqa: ARG001 - TransformerLens hook signature
            fired.add(name)
            return f(act)

        return fn

    fwd = [(names[layer], wrap(names[layer], f)) for layer, f in post_hooks.items()]
    if tokens.device != lm.device:
        tokens = tokens.to(lm.device)
    with torch.inference_mode(), lm.model.hooks(fwd_hooks=fwd):
        logits = lm.model(tokens, return_type="logits")
    _check_fired(lm, set(names.values()), fired)
    return logits


def mlp_weights(lm: LoadedModel) -> dict[str, torch.Tensor]:
    """The weights behind each neuron, in the loaded processing (see provenance).

    Returns:
        `W_in: [layer, d_model, d_mlp]`, `b_in: [layer, d_mlp]`,
        `W_out: [layer, d_mlp, d_model]`, `W_U: [d_model, d_vocab]`, all float32 on CPU.
    """
    m = lm.model
    with torch.no_grad():
        return {
            "W_in": m.W_in.detach().float().cpu(),
            "b_in": m.b_in.detach().float().cpu(),
            "W_out": m.W_out.detach().float().cpu(),
            "W_U": m.W_U.detach().float().cpu(),
        }


# ---------------------------------------------------------------------------- making models


@dataclass(frozen=True)
class GPT2Config:
    """A GPT-2-architecture model small enough to train on a CPU."""

    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512  # 4 x d_model, as in GPT-2
    n_ctx: int = 256
    d_vocab: int = 4096  # the demo tokenizer's vocabulary
    act_fn: str = "gelu_new"  # GPT-2's tanh-approximated GELU
    dropout: float = 0.0  # short single-epoch runs do not overfit; dropout only adds noise

    def __post_init__(self) -> None:
        for k in ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "d_vocab"):
            v = getattr(self, k)
            if not isinstance(v, int) or v <= 0:
                raise UniversalNeuronsError(f"GPT2Config.{k} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise UniversalNeuronsError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pick n_heads dividing d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UniversalNeuronsError(f"dropout must be in [0, 1), got {self.dropout}")


def init_gpt2(config: GPT2Config, *, seed: int, bos_token_id: int = 0, eos_token_id: int = 0):
    """A freshly initialised Hugging Face GPT-2 (`GPT2LMHeadModel`), deterministic in `seed`."""
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    hf_cfg = HFConfig(
        vocab_size=config.d_vocab,
        n_positions=config.n_ctx,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_mlp,
        activation_function=config.act_fn,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(hf_cfg)
    return model


def save_model_dir(model, tokenizer, path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Save a Hugging Face model with its tokenizer and a training record, so that
    `load_model(path)` loads it offline. Written to a temporary sibling and renamed, so a
    killed save never leaves a half-written model directory."""
    import shutil

    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / TRAINING_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path
