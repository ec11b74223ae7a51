"""Gradient-masking sanity checks, each a small function over an evaluation's per-sample record.

Smoothness regularisers can mask gradients, which makes white-box attacks look
weak. The checks follow Athalye et al. 2018 / Carlini et al. 2019 ("On
Evaluating Adversarial Robustness") and AutoAttack's own pre-flight checks
(Croce & Hein 2020, ``autoattack/checks.py``):

- some attack changes some prediction at the reported eps (an attack that did nothing,
  e.g. an L-inf radius given as L2, must not read as robustness);
- accuracy falls to about 0 at a very large eps;
- accuracy does not rise with eps (beyond noise);
- more PGD steps never raise accuracy (beyond noise);
- a black-box attack is not stronger than white-box PGD on the same samples;
- the model's outputs are deterministic (no randomness across calls);
- the outputs look like logits, not probabilities (softmax before the loss flattens gradients);
- the input gradients are not zero.

Each returns a ``SanityCheck``. A check that cannot run (its attack was
not run) says why, with ``ran=False``, instead of vanishing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .evaluation import RobustnessEvaluation

__all__ = [
    "SanityCheck",
    "attacks_change_predictions",
    "accuracy_vanishes_at_large_epsilon",
    "accuracy_falls_with_epsilon",
    "more_steps_do_not_help",
    "blackbox_is_not_stronger",
    "outputs_are_deterministic",
    "outputs_are_logits",
    "gradients_are_nonzero",
]


@dataclass(frozen=True)
class SanityCheck:
    """One gradient-masking check; ``passed=False`` means the robustness numbers are suspect.

    A check that could not run has ``ran=False``, counts as passed, and says why in ``detail``.
    """

    name: str
    passed: bool
    detail: str
    ran: bool = True


def _noise(p: float, n: int) -> float:
    """Two standard errors of an accuracy estimate, plus one sample."""
    return 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)) + 1 / max(n, 1)


def _not_run(name: str, why: str) -> SanityCheck:
    return SanityCheck(name, True, f"not run: {why}", ran=False)


def attacks_change_predictions(ev: RobustnessEvaluation) -> SanityCheck:
    """At the reported eps, at least one attack breaks at least one correctly classified sample.

    Robust accuracy equal to clean accuracy under every attack at every eps means the attacks did
    nothing: a ball far too small for its norm or units, or masked gradients; not a robust model.
    """
    name = "the attacks change some prediction at the reported eps"
    clean = ev.correct("clean", 0.0)
    if clean is None or not bool(clean.any()):
        return _not_run(name, "no sample is classified correctly clean, so none can be broken")
    rows = [r for r in ev.results if any(math.isclose(r.epsilon, e, rel_tol=1e-9) for e in ev.epsilons)]
    if not rows:
        return _not_run(name, "no attack ran at the reported eps")
    broken = sum(int((clean[: r.num_samples] & ~ev._recorded(r.attack, r.epsilon)).sum()) for r in rows)
    eps = ", ".join(f"{e:.4g}" for e in ev.epsilons)
    if broken:
        return SanityCheck(name, True, f"{broken} (attack, sample) pairs broken at eps {eps}")
    return SanityCheck(
        name,
        False,
        f"no attack changed a single correct prediction at eps {eps} ({len(rows)} attack runs): the ball may be far "
        "too small for its norm or units (an L-inf radius given as L2?), or the gradients are masked",
    )


def accuracy_vanishes_at_large_epsilon(
    ev: RobustnessEvaluation, attack: str, epsilon: float, max_accuracy: float = 0.02
) -> SanityCheck:
    """At an eps covering the whole input range every sample must be breakable."""
    name = "accuracy falls to ~0 at a very large eps"
    acc = ev.accuracy(attack, epsilon)
    if acc is None:
        return _not_run(name, f"{attack} was not run at eps {epsilon:.4g}")
    detail = f"{attack} accuracy {100 * acc:.2f} % at eps {epsilon:.4g} (must be <= {100 * max_accuracy:.1f} %)"
    return SanityCheck(name, acc <= max_accuracy, detail)


def accuracy_falls_with_epsilon(ev: RobustnessEvaluation, attack: str) -> SanityCheck:
    """Clean accuracy, then the attack's accuracy at growing eps, never rises beyond noise."""
    curve = sorted((r for r in ev.results if r.attack == attack), key=lambda r: r.epsilon)
    accs = [ev.clean_accuracy] + [r.accuracy for r in curve]
    rises = [(a, b) for a, b in zip(accs, accs[1:]) if b > a + _noise(a, ev.num_samples)]
    detail = "clean, then " + ", ".join(f"{100 * r.accuracy:.2f} % at {r.epsilon:.4g}" for r in curve)
    return SanityCheck("accuracy does not rise with eps", not rises, detail + (f"; rises: {rises}" if rises else ""))


def more_steps_do_not_help(ev: RobustnessEvaluation, few: str, many: str, epsilon: float) -> SanityCheck:
    """The stronger PGD finds at least as many adversarial examples as the main one."""
    name = "more PGD steps never raise accuracy"
    if few == many:
        return _not_run(name, f"the stronger PGD equals the main one ({few}); pass check_steps > the main PGD's steps")
    a, b = ev.accuracy(few, epsilon), ev.accuracy(many, epsilon)
    if a is None or b is None:
        return _not_run(name, f"{few} and {many} were not both run at eps {epsilon:.4g}")
    detail = f"{few} {100 * a:.2f} % vs {many} {100 * b:.2f} % at eps {epsilon:.4g}"
    return SanityCheck(name, b <= a + _noise(a, ev.num_samples), detail)


def blackbox_is_not_stronger(ev: RobustnessEvaluation, blackbox: str, whitebox: str, epsilon: float) -> SanityCheck:
    """A gradient-free attack beating the white-box one signals masked gradients; compared on the same samples."""
    name = f"black-box {blackbox} is not stronger than white-box {whitebox} (eps {epsilon:.4g})"
    black, white = ev.correct(blackbox, epsilon), ev.correct(whitebox, epsilon)
    if black is None or white is None:
        return _not_run(name, f"{blackbox} and {whitebox} were not both run at eps {epsilon:.4g}")
    m = min(len(black), len(white))
    b, w = black[:m].float().mean().item(), white[:m].float().mean().item()
    detail = f"{blackbox} {100 * b:.2f} % vs {whitebox} {100 * w:.2f} % on the same {m} samples"
    return SanityCheck(name, b >= w - _noise(w, m), detail)


def outputs_are_deterministic(model: nn.Module, x: Tensor) -> SanityCheck:
    """Two forward passes in eval mode give the same logits (a random defence fools PGD; use EOT for it)."""
    with torch.no_grad():
        a, b = model(x), model(x)
    same = torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    detail = "two passes agree" if same else f"two passes differ by up to {(a - b).abs().max().item():.3g}"
    return SanityCheck("model outputs are deterministic", same, detail)


def outputs_are_logits(model: nn.Module, x: Tensor) -> SanityCheck:
    """Rows in [0, 1] that sum to 1 are probabilities: attacks on them see flattened gradients."""
    with torch.no_grad():
        out = model(x).float()
    probabilities = bool((out.min() >= 0) & (out.max() <= 1)) and torch.allclose(
        out.sum(1), torch.ones(out.shape[0], device=out.device), atol=1e-4
    )
    detail = "outputs are rows of probabilities; return logits" if probabilities else "outputs are not probabilities"
    return SanityCheck("model outputs logits, not probabilities", not probabilities, detail)


def gradients_are_nonzero(model: nn.Module, x: Tensor, y: Tensor, max_fraction: float = 0.01) -> SanityCheck:
    """The margin loss's input gradient is non-zero on (almost) every sample.

    The margin ``logsumexp_{k != y} z_k - z_y`` (what PGD ascends) cannot
    underflow the way a saturated cross-entropy can, so a zero gradient means
    the model itself is flat (quantisation, hard thresholds).
    """
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        z = model(x).float()
        other = z.scatter(1, y[:, None], float("-inf")).logsumexp(dim=1)
        (grad,) = torch.autograd.grad((other - z.gather(1, y[:, None]).squeeze(1)).sum(), x)
    zero = (grad.flatten(1).abs().amax(dim=1) == 0).float().mean().item()
    detail = f"{100 * zero:.1f} % of {x.shape[0]} samples have a zero input gradient (at most {100 * max_fraction:g} %)"
    return SanityCheck("input gradients are non-zero", zero <= max_fraction, detail)


def standard_checks(
    ev: RobustnessEvaluation,
    *,
    main: str,
    strong: str,
    strongest_epsilon: float,
    large_epsilon: float,
    large_epsilon_max_accuracy: float,
    blackbox: Sequence[str],
) -> list[SanityCheck]:
    """The record-based checks ``evaluate_robustness`` runs."""
    checks = [
        attacks_change_predictions(ev),
        accuracy_vanishes_at_large_epsilon(ev, main, large_epsilon, large_epsilon_max_accuracy),
        accuracy_falls_with_epsilon(ev, main),
        more_steps_do_not_help(ev, main, strong, strongest_epsilon),
    ]
    for attack in blackbox:
        checks += [blackbox_is_not_stronger(ev, attack, main, eps) for eps in ev.epsilons]
    return checks
