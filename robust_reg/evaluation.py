"""Rigorous downstream robustness evaluation, with gradient-masking sanity checks.

The protocol of the robust-SSL literature: freeze the encoder, fit a linear
probe on clean features, attack ``head(encoder(x))``. Accuracy is reported on
clean inputs, under PGD-k (this package's attack engine), under AutoAttack
(Croce & Hein 2020, through torchattacks' maintained implementation, the
optional ``autoattack`` extra) and under the black-box Square attack.

Smoothness regularisers can mask gradients, which makes white-box attacks look
weak. Every evaluation therefore runs the sanity checks of Athalye et al. 2018
/ Carlini et al. 2019 and flags a failure loudly:

- accuracy falls to about 0 at a very large eps;
- accuracy does not rise with eps (beyond noise);
- more PGD steps never raise accuracy (beyond noise);
- the black-box Square attack is not stronger than white-box PGD (beyond noise).

All attack accuracies are estimates: an attack finds adversarial examples, it
does not prove none exist, so they are upper estimates of true robust accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import module_device, progress
from .attacks import ThreatModel, _check_steps, pgd_attack

__all__ = ["AttackAccuracy", "SanityCheck", "RobustnessEvaluation", "evaluate_robustness", "LinearProbeClassifier"]


class LinearProbeClassifier(nn.Module):
    """``head(flatten(encoder(x)))``: the downstream classifier that is attacked.

    Examples:
        >>> import torch
        >>> model = LinearProbeClassifier(torch.nn.Conv2d(1, 4, 3), torch.nn.Linear(4 * 6 * 6, 10))
        >>> model(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).flatten(start_dim=1))


class _PixelModel(nn.Module):
    """Takes ``[0, 1]`` pixels and normalises them for the model (for attacks that need pixel inputs)."""

    def __init__(self, model: nn.Module, threat: ThreatModel) -> None:
        super().__init__()
        self.model = model
        self.threat = threat

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model(self.threat.to_model(pixels))


@dataclass(frozen=True)
class AttackAccuracy:
    """Accuracy under one attack at one eps (an upper estimate of robust accuracy)."""

    attack: str
    epsilon: float
    accuracy: float
    num_samples: int

    @property
    def stderr(self) -> float:
        p = self.accuracy
        return math.sqrt(max(p * (1 - p), 0.0) / max(self.num_samples, 1))


@dataclass(frozen=True)
class SanityCheck:
    """One gradient-masking check; ``passed=False`` means the robustness numbers are suspect.

    A check that could not run has ``ran=False``, counts as passed, and says why in ``detail``.
    """

    name: str
    passed: bool
    detail: str
    ran: bool = True


@dataclass(frozen=True)
class RobustnessEvaluation:
    """Clean and attacked accuracy at several eps, and the sanity checks.

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        num_samples: Test samples attacked with PGD.
        clean_accuracy: Accuracy on clean inputs.
        results: Every attack's accuracy (estimates).
        checks: The gradient-masking sanity checks.
        skipped: Attacks that did not run, with the reason.
    """

    norm: str
    num_samples: int
    clean_accuracy: float
    results: tuple[AttackAccuracy, ...]
    checks: tuple[SanityCheck, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        """Whether every sanity check passed."""
        return all(c.passed for c in self.checks)

    def accuracy(self, attack: str, epsilon: float) -> float | None:
        """Accuracy of ``attack`` (e.g. ``"PGD-20"``, ``"AutoAttack"``, ``"Square"``) at ``epsilon``."""
        for r in self.results:
            if r.attack == attack and math.isclose(r.epsilon, epsilon, rel_tol=1e-9, abs_tol=1e-12):
                return r.accuracy
        return None

    def to_dict(self) -> dict:
        return {
            "norm": self.norm,
            "num_samples": self.num_samples,
            "clean_accuracy": self.clean_accuracy,
            "results": [asdict(r) for r in self.results],
            "checks": [asdict(c) for c in self.checks],
            "skipped": list(self.skipped),
            "passed": self.passed,
        }

    def __str__(self) -> str:
        attacks = list(dict.fromkeys(r.attack for r in self.results))
        epsilons = sorted({r.epsilon for r in self.results})
        head = f"{'eps':>8} " + " ".join(f"{a:>14}" for a in attacks)
        lines = [
            f"Robustness evaluation ({self.norm}, {self.num_samples} samples): clean accuracy "
            f"{100 * self.clean_accuracy:.2f} %",
            head,
            "-" * len(head),
        ]
        for eps in epsilons:
            cells = []
            for a in attacks:
                acc = self.accuracy(a, eps)
                cells.append(f"{'':>14}" if acc is None else f"{100 * acc:>13.2f}%")
            lines.append(f"{eps:>8.4g} " + " ".join(cells))
        lines.append("attack accuracies are estimates (upper estimates of robust accuracy)")
        for s in self.skipped:
            lines.append(f"skipped: {s}")
        for c in self.checks:
            mark = ("ok  " if c.ran else "n/a ") if c.passed else "!!! SANITY CHECK FAILED:"
            lines.append(f"{mark} {c.name}: {c.detail}")
        if not self.passed:
            lines.append(
                "!!! One or more gradient-masking checks failed: treat the robust accuracies above as suspect."
            )
        return "\n".join(lines)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    correct = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            correct.append(model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size])
    return torch.cat(correct)


def _pgd_correct(
    model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, steps: int, batch_size: int, bar: bool, desc: str
) -> Tensor:
    correct = []
    chunks = range(0, x.shape[0], batch_size)
    for i in progress(chunks, enabled=bar, desc=desc, total=len(chunks)):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        x_adv = pgd_attack(model, xb, yb, threat, steps=steps)
        with torch.no_grad():
            correct.append(model(x_adv).argmax(1) == yb)
    return torch.cat(correct)


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        return None
    return torchattacks


def _blackbox_correct(
    kind: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    threat: ThreatModel,
    num_classes: int,
    batch_size: int,
    seed: int,
    square_queries: int,
    bar: bool = False,
) -> Tensor:
    ta = _torchattacks()
    pixel_model = _PixelModel(model, threat).eval()
    ta_norm = "Linf" if threat.norm == "linf" else "L2"
    if kind == "AutoAttack":
        attack = ta.AutoAttack(
            pixel_model, norm=ta_norm, eps=threat.epsilon, version="standard", n_classes=num_classes, seed=seed
        )
    else:
        attack = ta.Square(
            pixel_model, norm=ta_norm, eps=threat.epsilon, n_queries=square_queries, n_restarts=1, seed=seed
        )
    correct = []
    chunks = range(0, x.shape[0], batch_size)
    for i in progress(chunks, enabled=bar, desc=f"{kind} eps={threat.epsilon:.3g}", total=len(chunks)):
        pixels = threat.to_pixels(x[i : i + batch_size]).clamp(*threat.bounds)
        adv = attack(pixels, y[i : i + batch_size])
        with torch.no_grad():
            correct.append(pixel_model(adv).argmax(1) == y[i : i + batch_size])
    return torch.cat(correct)


def _noise(p: float, n: int) -> float:
    """Two standard errors of an accuracy estimate, plus one sample."""
    return 2 * math.sqrt(max(p * (1 - p), 0.0) / max(n, 1)) + 1 / max(n, 1)


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epsilons: Sequence[float],
    norm: str = "linf",
    pgd_steps: int = 20,
    check_steps: int = 100,
    autoattack: bool | None = None,
    autoattack_samples: int | None = None,
    square: bool | None = None,
    square_queries: int = 1000,
    square_samples: int | None = None,
    large_epsilon: float | None = None,
    large_epsilon_max_accuracy: float = 0.02,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
    num_classes: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
    progress_bar: bool = False,
    log: Callable[[str], None] | None = None,
) -> RobustnessEvaluation:
    """Clean, PGD, AutoAttack and Square accuracy of a classifier, with sanity checks.

    Args:
        model: Maps inputs (model space) to logits; e.g. :class:`LinearProbeClassifier`.
        x: Test inputs in model space (normalised with ``mean``/``std`` if given).
        y: Test labels.
        epsilons: Radii to evaluate (pixel units).
        norm: ``"linf"`` or ``"l2"``.
        pgd_steps: Steps of the main PGD attack (PGD-20 by default).
        check_steps: Steps of the stronger PGD used by the "more steps" check
            (at the largest eps of ``epsilons``).
        autoattack: Run AutoAttack (standard version). ``None``: if torchattacks
            is installed. ``True`` without torchattacks raises ``ImportError``.
        autoattack_samples: Attack only the first samples with AutoAttack (cost).
        square: Run the Square attack. ``None``: if torchattacks is installed.
        square_queries: Query budget of the Square attack.
        square_samples: Attack only the first samples with Square.
        large_epsilon: The eps at which accuracy must fall to about 0 (default:
            the whole valid range, 1.0 for L-inf, ``sqrt(d)`` for L2).
        large_epsilon_max_accuracy: The largest accuracy that counts as "about 0".
        mean: Normalisation mean already applied to ``x``.
        std: Normalisation std already applied to ``x``.
        bounds: Valid pixel range.
        num_classes: Number of classes (default: ``y.max() + 1``).
        batch_size: Samples per attack batch.
        seed: Seed of the attacks' randomness.
        progress_bar: Show progress bars.
        log: Called with one line per finished attack (accuracy, samples,
            seconds), e.g. ``print``; independent of ``progress_bar``.

    Returns:
        A :class:`RobustnessEvaluation`; ``print`` it for a table that flags failed checks.

    Raises:
        ImportError: If ``autoattack=True`` or ``square=True`` and torchattacks is missing.
        ValueError: For bad ``epsilons``, ``norm``, steps, or inputs outside ``bounds``.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 2, (64,))
        >>> ev = evaluate_robustness(model, x, y, epsilons=[0.1], pgd_steps=5, check_steps=10,
        ...                          autoattack=False, square=False)
        >>> ev.accuracy("PGD-5", 0.1) <= ev.clean_accuracy
        True
    """
    if isinstance(epsilons, (int, float)) or len(epsilons) == 0:
        raise ValueError(f"epsilons must be a non-empty sequence of floats, got {epsilons!r}")
    threats = [ThreatModel(eps, norm=norm, bounds=bounds, mean=mean, std=std) for eps in epsilons]
    pgd_steps, check_steps = _check_steps(pgd_steps, "pgd_steps"), _check_steps(check_steps, "check_steps")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    threats[0].check_inputs(x, "x")
    ta = _torchattacks()
    if (autoattack or square) and ta is None:
        raise ImportError("AutoAttack and Square need torchattacks: pip install 'robust-reg[autoattack]'")
    autoattack = ta is not None if autoattack is None else autoattack
    square = ta is not None if square is None else square
    device = module_device(model)
    x, y = x.to(device), y.to(device).long()
    n = x.shape[0]
    num_classes = int(num_classes or int(y.max().item()) + 1)
    # torch.manual_seed reseeds every CUDA device too: fork all of them, so the caller's state survives.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    results: list[AttackAccuracy] = []
    skipped: list[str] = []
    clock = [time.perf_counter()]

    def record(attack: str, epsilon: float, correct: Tensor) -> None:
        result = AttackAccuracy(attack, epsilon, correct.float().mean().item(), correct.numel())
        results.append(result)
        if log is not None:
            now = time.perf_counter()
            log(
                f"  {attack} @{epsilon:.4g}: {100 * result.accuracy:.1f} % on {result.num_samples} samples "
                f"({now - clock[0]:.0f} s)"
            )
            clock[0] = now

    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        with preserved_state(model, eval_mode=True):
            clean = _accuracy(model, x, y, batch_size).float().mean().item()
            pgd_name = f"PGD-{pgd_steps}"
            pgd_correct: dict[float, Tensor] = {}
            for threat in threats:
                desc = f"{pgd_name} eps={threat.epsilon:.3g}"
                acc = _pgd_correct(model, x, y, threat, pgd_steps, batch_size, progress_bar, desc)
                pgd_correct[threat.epsilon] = acc
                record(pgd_name, threat.epsilon, acc)
            strongest = max(threats, key=lambda t: t.epsilon)
            if check_steps != pgd_steps:  # the same attack again would only repeat a row
                acc = _pgd_correct(
                    model, x, y, strongest, check_steps, batch_size, progress_bar, f"PGD-{check_steps} check"
                )
                record(f"PGD-{check_steps}", strongest.epsilon, acc)
            if large_epsilon is None:
                d = x[0].numel()
                span = threats[0].bounds[1] - threats[0].bounds[0]
                large_epsilon = span if norm == "linf" else span * math.sqrt(d)
            big = ThreatModel(large_epsilon, norm=norm, bounds=bounds, mean=mean, std=std)
            acc = _pgd_correct(model, x, y, big, pgd_steps, batch_size, progress_bar, "large-eps check")
            record(pgd_name, big.epsilon, acc)
            blackbox = (("AutoAttack", autoattack, autoattack_samples), ("Square", square, square_samples))
            for kind, enabled, limit in blackbox:
                if not enabled:
                    skipped.append(f"{kind} (disabled)" if ta is not None else f"{kind} (torchattacks not installed)")
                    continue
                m = min(n, limit or n)
                for threat in threats:
                    correct = _blackbox_correct(
                        kind, model, x[:m], y[:m], threat, num_classes, batch_size, seed, square_queries, progress_bar
                    )
                    record(kind, threat.epsilon, correct)
    checks = _sanity_checks(
        results, pgd_correct, pgd_name, check_steps, strongest.epsilon, big.epsilon, large_epsilon_max_accuracy, clean
    )
    return RobustnessEvaluation(norm, n, clean, tuple(results), tuple(checks), tuple(skipped))


def _sanity_checks(
    results: list[AttackAccuracy],
    pgd_correct: dict[float, Tensor],
    pgd_name: str,
    check_steps: int,
    strongest: float,
    large: float,
    large_max: float,
    clean: float,
) -> list[SanityCheck]:
    n = len(next(iter(pgd_correct.values())))

    def find(attack: str, eps: float) -> AttackAccuracy | None:
        return next((r for r in results if r.attack == attack and math.isclose(r.epsilon, eps)), None)

    checks = []
    big = find(pgd_name, large)
    checks.append(
        SanityCheck(
            "accuracy falls to ~0 at a very large eps",
            big.accuracy <= large_max,
            f"{pgd_name} accuracy {100 * big.accuracy:.2f} % at eps {large:.4g} (must be <= {100 * large_max:.1f} %)",
        )
    )
    curve = sorted((r for r in results if r.attack == pgd_name), key=lambda r: r.epsilon)
    accs = [clean] + [r.accuracy for r in curve]
    rises = [(a, b) for a, b in zip(accs, accs[1:]) if b > a + _noise(a, n)]
    checks.append(
        SanityCheck(
            "accuracy does not rise with eps",
            not rises,
            "clean, then "
            + ", ".join(f"{100 * r.accuracy:.2f} % at {r.epsilon:.4g}" for r in curve)
            + ("" if not rises else f"; rises: {rises}"),
        )
    )
    few, many = find(pgd_name, strongest), find(f"PGD-{check_steps}", strongest)
    if f"PGD-{check_steps}" == pgd_name:
        checks.append(
            SanityCheck(
                "more PGD steps never raise accuracy",
                True,
                f"not run: check_steps equals pgd_steps ({check_steps}); pass check_steps > pgd_steps to run it",
                ran=False,
            )
        )
    else:
        checks.append(
            SanityCheck(
                "more PGD steps never raise accuracy",
                many.accuracy <= few.accuracy + _noise(few.accuracy, n),
                f"{pgd_name} {100 * few.accuracy:.2f} % vs PGD-{check_steps} {100 * many.accuracy:.2f} % "
                f"at eps {strongest:.4g}",
            )
        )
    for sq in (r for r in results if r.attack == "Square"):
        # Compare on the same samples: Square may have attacked only the first ones.
        white = pgd_correct[sq.epsilon][: sq.num_samples].float().mean().item()
        checks.append(
            SanityCheck(
                f"black-box Square is not stronger than white-box PGD (eps {sq.epsilon:.4g})",
                sq.accuracy >= white - _noise(white, sq.num_samples),
                f"Square {100 * sq.accuracy:.2f} % vs {pgd_name} {100 * white:.2f} % on the same "
                f"{sq.num_samples} samples",
            )
        )
    return checks
