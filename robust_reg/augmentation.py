"""An annealed augmentation schedule: strong views early, weak views late (DynACL's).

Luo, Wang and Wang (ICLR 2023) found that adversarial contrastive learning
gains robustness when the augmentation strength falls from strong to weak over
training, refreshed in steps (every 50 of 1,000 epochs). ``augmentation_strength``
gives that strength for any epoch count; the pipeline applies it by scaling its
augmentation's magnitudes and probabilities (colour jitter, its probability,
grayscale's probability, and the crop's smallest area ``1 - (1 - min_scale) * s``;
flips stay). The package's batch augmentation takes it as ``strength``, the lightly
adapter's ``AnnealedAugmentation`` callback
hands it to a function that rebuilds a transform each epoch, and a plain loop
calls it once per epoch.
"""

from __future__ import annotations

__all__ = ["augmentation_strength"]


def augmentation_strength(epoch: int, epochs: int, *, refresh: float = 0.05, final: float = 0.0) -> float:
    """The augmentation strength in ``(final, 1]`` at ``epoch`` (0-based) of ``epochs``.

    Falls linearly from 1 towards ``final`` in steps: it is refreshed every
    ``refresh * epochs`` epochs (at least every epoch), as DynACL's
    ``1 - (e - 1) / E`` refreshed every 50 of 1,000 epochs.

    Args:
        epoch: The current epoch, from 0.
        epochs: Epochs of the whole run.
        refresh: The fraction of the run between two refreshes (DynACL: 50 / 1000).
        final: The strength the schedule falls towards at the end of the run (DynACL: 0).

    Returns:
        The strength; multiply the augmentation's magnitudes and probabilities by it.

    Raises:
        ValueError: For ``epochs < 1``, an ``epoch`` outside ``[0, epochs)``, ``refresh`` outside ``(0, 1]``
            or ``final`` outside ``[0, 1]``.

    Examples:
        >>> [round(augmentation_strength(e, 30), 3) for e in (0, 1, 2, 3, 29)]
        [1.0, 1.0, 0.933, 0.933, 0.067]
        >>> round(augmentation_strength(999, 1000), 3)  # refreshed every 50 of 1,000 epochs, as DynACL
        0.05
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be an int in [0, epochs={epochs}), got {epoch!r}")
    if not 0 < refresh <= 1:
        raise ValueError(f"refresh must be in (0, 1], got {refresh!r}")
    if not 0 <= final <= 1:
        raise ValueError(f"final must be in [0, 1], got {final!r}")
    every = max(1, round(refresh * epochs))
    fallen = (epoch // every) * every / epochs
    return 1.0 - (1.0 - final) * fallen
