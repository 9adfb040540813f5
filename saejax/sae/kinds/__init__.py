"""The SAE kinds, one object each, found by name: ``kinds.get("topk")``.

A kind (``Kind``, kinds/base.py) owns everything that differs between kinds: its training
activation and loss terms, extra parameters, constraints and step-0 calibration, its inference
formula, what it exports (threshold array, k), its names (sweep value, Gemma Scope layout, SAELens)
and its config checks. Nothing outside these modules tests a kind's name.

Adding a kind: one module here with a ``Kind`` subclass, and one ``register`` line below
(docs/architecture.md, "Adding an SAE kind").
"""
from __future__ import annotations

from saejax.sae.kinds import batchtopk, jumprelu, relu, topk
from saejax.sae.kinds.base import Kind

_KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Make ``kind`` available under ``kind.name`` (config sae.arch, GroupSpec.arch)."""
    _KINDS[kind.name] = kind
    return kind


def get(name: str) -> Kind:
    if name not in _KINDS:
        raise ValueError(f"unknown SAE kind {name!r}; the kinds are {names()}")
    return _KINDS[name]


def names() -> tuple[str, ...]:
    return tuple(_KINDS)


def released_with_k() -> Kind:
    """The kind whose released archives hold a k (TopK): a Gemma Scope-layout params.npz with a k is one."""
    return next(k for k in _KINDS.values() if k.infers_with_k and k.release_name == k.name)


def from_saelens(architecture: str | None) -> Kind | None:
    """The released kind of a SAELens "architecture" (None for one saejax has no kind for)."""
    return next((k for k in _KINDS.values()
                 if architecture is not None and k.saelens_name == architecture and k.release_name == k.name), None)


register(jumprelu.JumpReLU())
register(topk.TopK())
register(batchtopk.BatchTopK())
register(relu.ReLU())
