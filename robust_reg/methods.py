"""The recommended settings per SSL method: one table that the adapters, the CLI and the benchmarks read.

The regulariser's own defaults are the same for every method (the embedding the SSL loss
compares, L2-normalised, the positive-pair ascent); what differs per method is the weight of
its term and which output is "the embedding the loss compares".
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["MethodSettings", "METHOD_SETTINGS", "method_settings"]


@dataclass(frozen=True)
class MethodSettings:
    """The recommended settings of one SSL method.

    Attributes:
        weight: Multiplier of the regulariser's term in the loss.
        embedding: What the method's loss compares (the ``model`` to pass the regulariser).
        solo_key: The entry of solo-learn's ``forward`` output holding that embedding.
        measured: Whether ``weight`` was chosen by a side-by-side benchmark (else: the default 1.0,
            not measured for this method).
    """

    weight: float
    embedding: str
    solo_key: str
    measured: bool


#: Keys are lower-case method names (solo-learn's class names, lower-cased). BYOL's weight is small: its
#: adversarial view carries the robustness and a larger weight costs clean accuracy (benchmarks/results/).
METHOD_SETTINGS: dict[str, MethodSettings] = {
    "simclr": MethodSettings(1.0, "the projection head's output", "z", measured=True),
    "byol": MethodSettings(0.05, "the online prediction head's output", "p", measured=True),
}
# Methods mapped (which output their loss compares, read from solo-learn 1.0.6) but not benchmarked: weight 1.0.
_UNMEASURED = {
    "mocov3": ("the query's prediction head output", "q"),
    "mocov2plus": ("the query projection", "z"),
    "vicreg": ("the expander (projector) output", "z"),
    "vibcreg": ("the projector output", "z"),
    "barlowtwins": ("the projector output", "z"),
    "dino": ("the student head's output", "z"),
    "simsiam": ("the prediction head's output", "p"),
    "nnbyol": ("the online prediction head's output", "p"),
    "ressl": ("the projection", "z"),
    "wmse": ("the projection", "z"),
}
METHOD_SETTINGS.update({name: MethodSettings(1.0, *what, measured=False) for name, what in _UNMEASURED.items()})


def method_settings(method: str | type | nn.Module) -> MethodSettings | None:
    """The settings of ``method`` (a name such as ``"byol"``, or a class or instance named after one).

    Returns ``None`` for a method not in ``METHOD_SETTINGS``.

    Examples:
        >>> method_settings("BYOL").weight
        0.05
        >>> method_settings("MoCoV3").solo_key
        'q'
    """
    if isinstance(method, nn.Module):
        method = type(method)
    if isinstance(method, type):
        for cls in method.__mro__:
            found = METHOD_SETTINGS.get(cls.__name__.lower())
            if found is not None:
                return found
        return None
    if not isinstance(method, str):
        raise TypeError(f"method must be a name, a class or a module, got {type(method).__name__}")
    return METHOD_SETTINGS.get(method.lower().replace("-", "").replace("_", "").replace(" ", ""))
