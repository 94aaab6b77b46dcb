"""Hook names and forward passes: where a neuron is read or written, checked against the model.

A neuron's activation is `blocks.{layer}.mlp.hook_post` (after the nonlinearity; `hook_pre`
before it), the TransformerLens name every stage shares (docs/method.md §3). Every pass here
checks its hook names against the model's `hook_dict` first and that every hook ran after,
so a name that attaches to nothing is an error, never an unhooked pass (an ablation would
read as a change of 0). Hooks are scoped: removed when the pass ends, also after an error.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from universal_neurons.errors import IncompatibleInputsError, UniversalNeuronsError

from .models import LoadedModel

__all__ = [
    "HookKind",
    "hook_name",
    "parse_hook_name",
    "check_hook_names",
    "mlp_activations",
    "run_with_post_hooks",
    "mlp_weights",
]

HookKind = str  # "post" (after the nonlinearity) or "pre"; checked where a hook name is made


def hook_name(layer: int, kind: HookKind = "post") -> str:
    """`blocks.{layer}.mlp.hook_{kind}`: the activation after (`post`) or before (`pre`)
    the MLP nonlinearity.

    Raises:
        UniversalNeuronsError: a kind other than `post` or `pre`.
    """
    if kind not in ("post", "pre"):
        raise UniversalNeuronsError(f"unknown hook kind {kind!r}; use 'post' or 'pre'")
    return f"blocks.{int(layer)}.mlp.hook_{kind}"


def parse_hook_name(name: str) -> tuple[int, HookKind]:
    """Inverse of `hook_name`: `'blocks.3.mlp.hook_post'` -> `(3, 'post')`.

    Raises:
        UniversalNeuronsError: a name that is not an MLP neuron hook.
    """
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


def _check_layers(lm: LoadedModel, layers: Sequence[int] | None) -> list[int]:
    """The layers asked for, ascending and unique; `None` means every layer.

    Raises:
        UniversalNeuronsError: a layer the model does not have.
    """
    if layers is None:
        return list(range(lm.n_layers))
    out = [int(layer) for layer in layers]
    bad = [layer for layer in out if not 0 <= layer < lm.n_layers]
    if bad:
        raise UniversalNeuronsError(
            f"layer(s) {bad} do not exist in {lm.name}, which has layers 0..{lm.n_layers - 1}"
        )
    return sorted(set(out))


class _StopForward(Exception):
    """Raised by the last needed hook: the rest of the forward pass (and the unembedding)
    is skipped. Private so a user's exception is never swallowed."""


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
        lm: the model.
        tokens: `Int[Tensor, "batch pos"]`.
        kinds: `'post'` (after the nonlinearity) and/or `'pre'`.
        layers: which layers (default all).

    Returns:
        `{hook_name: Float[Tensor, "batch pos d_mlp"]}` on the model's device, in layer order.

    Raises:
        UniversalNeuronsError: a layer the model does not have.
        IncompatibleInputsError: a hook name the model lacks, or a hook that never ran.
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
        lm: the model.
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

    Args:
        lm: the model.

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
