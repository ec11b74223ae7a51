"""The downstream bound: what the representation guarantees, next to what an attack reaches.

If ``z -> loss(head(z), y)`` is ``L``-Lipschitz in the L2 norm, then for any task

    E max_{x' in B(x)} loss(head(f(x')), y)  <=  E loss(head(f(x)), y)  +  L * R_eps(f),
    R_eps(f) = E_x max_{x' in B(x)} ||f(x') - f(x)||_2.

For a linear head with cross-entropy ``L = sqrt(2) * ||W||_2``. ``R_eps`` is
estimated by projected gradient ascent (a lower estimate of the max), so the
bound, like every number built from the ascent, is an *estimate*.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import flat, module_device, progress, unpack_batch
from .attacks import (
    ThreatModel,
    _check_step_size,
    _check_steps,
    pgd_attack,
    projected_gradient_ascent,
    resolve_threat,
)

__all__ = ["BoundReport", "RobustnessCurve", "estimate_bound", "robustness_curve", "linear_head_lipschitz"]


@dataclass(frozen=True)
class BoundReport:
    """Clean and adversarial downstream numbers, and the bound that links them.

    Accuracies are fractions in ``[0, 1]``. Fields built from gradient ascent are
    estimates: the attack and the deviation ascent find lower estimates of the
    true worst case.

    Attributes:
        epsilon: Radius of the threat ball, a fraction of the pixel range.
        norm: ``"linf"`` or ``"l2"``.
        steps: Ascent steps of both the attack and the deviation ascent.
        num_samples: Number of evaluated samples.
        clean_loss: Mean cross-entropy of ``head(encoder(x))``.
        adversarial_loss: Mean cross-entropy under the PGD attack (estimate).
        mean_deviation: ``R_eps``: mean estimated max feature deviation ``D(x)`` (estimate).
        relative_deviation: ``R_eps / sigma`` (estimate).
        sigma: Root mean squared distance of the clean features to their mean (the spread).
        lipschitz: Lipschitz constant of ``z -> CE(head(z), y)``, ``sqrt(2) * ||W||_2`` (exact).
        bound: ``clean_loss + lipschitz * mean_deviation`` (estimate).
        clean_accuracy: Accuracy on clean inputs.
        adversarial_accuracy: Accuracy under the PGD attack (estimate, an upper estimate of robust accuracy).
        predicted_robust_accuracy: Fraction whose logit margins survive a feature
            change of ``D(x)`` in the worst direction for the head (the margin form of the bound,
            through Cauchy-Schwarz: ``z_y - z_k > ||w_y - w_k|| D(x)``; estimate, ``None`` for
            non-linear heads). It holds for a feature change of that size in *any* direction, so it
            sits far below what an attack leaves (the attack's change is not aligned with
            ``w_y - w_k``): a guarantee-style reading, not a forecast of the attacked accuracy.
    """

    epsilon: float
    norm: str
    steps: int
    num_samples: int
    clean_loss: float
    adversarial_loss: float
    mean_deviation: float
    relative_deviation: float
    sigma: float
    lipschitz: float
    bound: float
    clean_accuracy: float
    adversarial_accuracy: float
    predicted_robust_accuracy: float | None
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        """A JSON-serialisable dict of all fields."""
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    def __str__(self) -> str:
        pct = lambda v: "n/a" if v is None else f"{100 * v:.2f} %"  # noqa: E731
        rows = [
            ("clean accuracy", pct(self.clean_accuracy), ""),
            ("adversarial accuracy", pct(self.adversarial_accuracy), f"estimate: PGD-{self.steps}"),
            (
                "predicted robust accuracy",
                pct(self.predicted_robust_accuracy),
                "estimate: margin > |w_y - w_k| D(x), any direction of change: far below attacked accuracy",
            ),
            ("clean loss", f"{self.clean_loss:.4f}", ""),
            ("adversarial loss", f"{self.adversarial_loss:.4f}", f"estimate: PGD-{self.steps}"),
            ("bound  clean + L * R", f"{self.bound:.4f}", "estimate (R is estimated)"),
            ("Lipschitz L", f"{self.lipschitz:.4f}", "exact: sqrt(2) ||W||_2"),
            ("mean deviation R_eps", f"{self.mean_deviation:.4f}", "estimate: mean max ||f(x')-f(x)||"),
            ("relative deviation R/sigma", f"{self.relative_deviation:.4f}", "estimate"),
            ("feature spread sigma", f"{self.sigma:.4f}", ""),
        ]
        width = max(len(r[0]) for r in rows)
        head = f"BoundReport: eps={self.epsilon:.4g} ({self.norm}), {self.num_samples} samples"
        lines = [head, "-" * len(head)]
        lines += [f"  {name:<{width}}  {value:>10}  {note}".rstrip() for name, value, note in rows]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class RobustnessCurve:
    """``BoundReport`` s over several eps; prints as one table."""

    reports: tuple[BoundReport, ...]

    @property
    def epsilons(self) -> list[float]:
        return [r.epsilon for r in self.reports]

    def to_dict(self) -> dict:
        return {"reports": [r.to_dict() for r in self.reports]}

    def __len__(self) -> int:
        return len(self.reports)

    def __iter__(self):
        return iter(self.reports)

    def __getitem__(self, i: int) -> BoundReport:
        return self.reports[i]

    def __str__(self) -> str:
        header = (
            f"{'eps':>8} {'clean acc':>10} {'adv acc*':>9} {'pred acc*':>10} {'adv loss*':>10} {'bound*':>9} {'R*':>9}"
        )
        lines = [header, "-" * len(header)]
        for r in self.reports:
            pred = "n/a" if r.predicted_robust_accuracy is None else f"{100 * r.predicted_robust_accuracy:.2f}"
            lines.append(
                f"{r.epsilon:>8.4g} {100 * r.clean_accuracy:>10.2f} {100 * r.adversarial_accuracy:>9.2f} "
                f"{pred:>10} {r.adversarial_loss:>10.4f} {r.bound:>9.4f} {r.mean_deviation:>9.4f}"
            )
        lines.append(
            "* estimates from gradient ascent: accuracies under attack are upper estimates of robust accuracy; "
            "the adversarial loss, R and the bound build on lower estimates of the worst case"
        )
        return "\n".join(lines)


def linear_head_lipschitz(head: nn.Linear) -> float:
    """Lipschitz constant of ``z -> cross_entropy(head(z), y)`` in L2: ``sqrt(2) * ||W||_2``.

    The gradient in ``z`` is ``W^T (softmax - onehot)``, and ``||softmax - onehot|| <= sqrt(2)``.

    Examples:
        >>> head = torch.nn.Linear(4, 3)
        >>> with torch.no_grad():
        ...     _ = head.weight.copy_(torch.eye(3, 4))
        >>> round(linear_head_lipschitz(head), 4)
        1.4142
    """
    if not isinstance(head, nn.Linear):
        raise TypeError(f"head must be an nn.Linear, got {type(head).__name__}")
    with torch.no_grad():
        return math.sqrt(2.0) * torch.linalg.matrix_norm(head.weight.double(), ord=2).item()


def estimate_bound(
    encoder: nn.Module,
    head: nn.Module,
    loader: Iterable,
    *,
    epsilon: float | None = None,
    threat: ThreatModel | None = None,
    norm: str | None = None,
    steps: int = 20,
    step_size: float | None = None,
    random_start: bool = True,
    lipschitz: float | None = None,
    device: str | torch.device | None = None,
    max_batches: int | None = None,
    progress_bar: bool = False,
    adversarial_inputs: Tensor | None = None,
    **deprecated: object,
) -> BoundReport:
    """Estimate the downstream bound ``E max loss(h(f(x'))) <= E loss(h(f(x))) + L * R_eps(f)`` for ``head``.

    The bound holds for every ``L``-Lipschitz head at once (docs: The bound, ``docs/guides/bound.md``).

    For each batch: clean loss and accuracy of ``head(encoder(x))``; a PGD-``steps``
    attack on that cross-entropy (adversarial loss and accuracy); and the estimated
    max feature deviation ``D(x)``, the larger of what a deviation ascent of
    ``steps`` steps finds and how far the PGD attack moved the features (both are
    points of the ball, so the larger is the better lower estimate). Then
    ``bound = clean_loss + L * mean D``. Per sample the cross-entropy is
    L-Lipschitz in the features, so the reported adversarial loss never exceeds
    the reported bound.

    The encoder and head run in eval mode; their modes, statistics and flags are
    restored afterwards.

    Args:
        encoder: Backbone ``f``; its output is flattened per sample.
        head: Downstream head on the flattened features, usually an ``nn.Linear``.
        loader: Yields ``(x, y, ...)`` batches of test data, ``x`` normalised as ``threat`` says.
        epsilon: Radius of the threat ball, a fraction of the pixel range (``8 / 255``): the shorthand
            for ``threat=ThreatModel(epsilon, norm=norm)``.
        threat: The whole ball instead (radius, norm, the inputs' ``mean``/``std`` and ``bounds``).
        norm: With ``epsilon``: ``"linf"`` (default) or ``"l2"``.
        steps: Steps of the PGD attack and of the deviation ascent.
        step_size: Step length (default ``2.5 * epsilon / steps``).
        random_start: Random start for both ascents. Without it the deviation
            ascent cannot leave ``x`` (the deviation's gradient is zero there), so
            ``R_eps`` rests on the PGD points' displacement alone: still a lower
            estimate, a weaker one.
        lipschitz: Lipschitz constant of the loss in the features, required if
            ``head`` is not an ``nn.Linear``.
        device: Where to run (default: the encoder's device).
        max_batches: Evaluate only this many batches.
        progress_bar: Show a progress bar.
        adversarial_inputs: PGD examples already found for the loader's samples, in
            order (e.g. ``RobustnessEvaluation.adversarial_inputs("PGD-20", eps)`` from
            ``evaluate_robustness`` with the same steps): used
            instead of running the attack again.

    Returns:
        A ``BoundReport``.

    Raises:
        TypeError: If ``head`` is not an ``nn.Linear`` and ``lipschitz`` is not given.
        ValueError: For a bad ``epsilon``, ``norm``, ``steps``, ``bounds``,
            ``mean``/``std`` or an empty loader.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        >>> x = torch.rand(32, 1, 4, 4); y = torch.randint(0, 3, (32,))
        >>> head = nn.Linear(8, 3)
        >>> report = estimate_bound(encoder, head, [(x, y)], epsilon=0.05, steps=5)
        >>> report.adversarial_loss <= report.bound + 1e-6
        True
    """
    threat = resolve_threat(threat, epsilon, norm, deprecated, where="estimate_bound")
    epsilon = threat.epsilon
    steps, step_size = _check_steps(steps), _check_step_size(step_size)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    lipschitz, notes = _lipschitz_of(head, lipschitz)
    if adversarial_inputs is not None:
        notes.append("PGD examples reused from the evaluation's attack (same settings)")
    device = torch.device(device) if device is not None else module_device(encoder)
    ascent = dict(threat=threat, steps=steps, step_size=step_size, random_start=random_start)
    totals = _Totals(weight=head.weight.detach().float() if isinstance(head, nn.Linear) else None)
    with preserved_state(encoder, eval_mode=True), preserved_state(head, eval_mode=True):
        for i, batch in enumerate(progress(loader, enabled=progress_bar, desc=f"bound eps={epsilon:.3g}")):
            if max_batches is not None and i >= max_batches:
                break
            x, y = (t.to(device) for t in unpack_batch(batch))
            threat.check_inputs(x, "loader inputs", warn=i == 0)
            reused = None
            if adversarial_inputs is not None:
                reused = adversarial_inputs[totals.n : totals.n + x.shape[0]].to(device)
                if reused.shape != x.shape:
                    raise ValueError(
                        f"adversarial_inputs must hold one input per loader sample in order; it has "
                        f"{adversarial_inputs.shape[0]} for at least {totals.n + x.shape[0]} samples"
                    )
            totals.add(encoder, head, x, y, ascent, reused)
    if totals.n == 0:
        raise ValueError("loader yielded no samples")
    return totals.report(threat, steps, lipschitz, notes)


def _lipschitz_of(head: nn.Module, lipschitz: float | None) -> tuple[float, list[str]]:
    """The loss's Lipschitz constant in the features, computed for a linear head or given by the caller."""
    if lipschitz is None:
        if not isinstance(head, nn.Linear):
            raise TypeError(
                f"head must be an nn.Linear for the Lipschitz constant to be computed, got "
                f"{type(head).__name__}; pass lipschitz= for other heads"
            )
        return linear_head_lipschitz(head), []
    if not (isinstance(lipschitz, (int, float)) and math.isfinite(lipschitz) and lipschitz >= 0):
        raise ValueError(f"lipschitz must be a finite number >= 0, got {lipschitz!r}")
    return float(lipschitz), ["Lipschitz constant given by the caller"]


@dataclass
class _Totals:
    """Running sums over the batches of ``estimate_bound``."""

    weight: Tensor | None
    n: int = 0
    clean_loss: float = 0.0
    adversarial_loss: float = 0.0
    deviation: float = 0.0
    clean_correct: float = 0
    adversarial_correct: float = 0
    predicted: float = 0
    feature_sum: Tensor | None = None
    feature_sq: float = 0.0

    def add(self, encoder: nn.Module, head: nn.Module, x: Tensor, y: Tensor, ascent: dict, x_ce: Tensor | None):
        """One batch: clean numbers, the PGD attack (or its reused result) and the deviation ascent."""
        with torch.no_grad():
            h = flat(encoder(x)).float()
            logits = head(h).float()
        if x_ce is None:
            x_ce = pgd_attack(lambda v: head(flat(encoder(v))), x, y, **ascent)

        def deviation(v: Tensor) -> Tensor:
            return (flat(encoder(v)).float() - h).pow(2).sum(dim=1)

        x_dev = projected_gradient_ascent(deviation, x, keep_best=True, **ascent)
        with torch.no_grad():
            h_ce = flat(encoder(x_ce)).float()
            adv_logits = head(h_ce).float()
            # Both are points of the ball: the larger displacement is the better lower estimate of D(x).
            dist = torch.maximum((flat(encoder(x_dev)).float() - h).norm(dim=1), (h_ce - h).norm(dim=1))
        self.n += x.shape[0]
        self.clean_loss += F.cross_entropy(logits, y, reduction="sum").item()
        self.adversarial_loss += F.cross_entropy(adv_logits, y, reduction="sum").item()
        self.deviation += dist.sum().item()
        self.clean_correct += (logits.argmax(1) == y).sum().item()
        self.adversarial_correct += (adv_logits.argmax(1) == y).sum().item()
        if self.weight is not None:
            self.predicted += _margin_survives(logits, y, self.weight, dist).sum().item()
        hd = h.double()
        self.feature_sum = hd.sum(0) if self.feature_sum is None else self.feature_sum + hd.sum(0)
        self.feature_sq += hd.pow(2).sum().item()

    def report(self, threat: ThreatModel, steps: int, lipschitz: float, notes: list[str]) -> BoundReport:
        n = self.n
        if self.feature_sum is None:
            raise ValueError("loader yielded no batches")
        sigma = math.sqrt(max(self.feature_sq / n - (self.feature_sum / n).pow(2).sum().item(), 0.0))
        mean_deviation, clean_loss = self.deviation / n, self.clean_loss / n
        return BoundReport(
            epsilon=threat.epsilon,
            norm=threat.norm,
            steps=steps,
            num_samples=n,
            clean_loss=clean_loss,
            adversarial_loss=self.adversarial_loss / n,
            mean_deviation=mean_deviation,
            relative_deviation=mean_deviation / sigma if sigma > 0 else math.inf,
            sigma=sigma,
            lipschitz=lipschitz,
            bound=clean_loss + lipschitz * mean_deviation,
            clean_accuracy=self.clean_correct / n,
            adversarial_accuracy=self.adversarial_correct / n,
            predicted_robust_accuracy=self.predicted / n if self.weight is not None else None,
            notes=tuple(notes),
        )


def _margin_survives(logits: Tensor, y: Tensor, weight: Tensor, dist: Tensor) -> Tensor:
    """Whether every logit margin ``z_y - z_k`` exceeds ``||w_y - w_k|| * D(x)``.

    ``(z_y - z_k)(x') >= (z_y - z_k)(x) - ||w_y - w_k|| ||f(x') - f(x)||``, so a
    sample passing this keeps its (correct) prediction under any feature change
    up to ``D(x)``. Checking each class pair is implied by, and at least as
    tight as, the single test ``margin > max_k ||w_y - w_k|| * D(x)``.
    """
    gaps = torch.cdist(weight, weight)  # (K, K) ||w_j - w_k||
    margins = logits.gather(1, y[:, None]) - logits  # (N, K), 0 at k = y
    needed = gaps[y] * dist[:, None]
    ok = margins > needed
    ok[torch.arange(len(y), device=y.device), y] = True
    return ok.all(dim=1)


def robustness_curve(
    encoder: nn.Module,
    head: nn.Module,
    loader: Iterable,
    epsilons: Sequence[float],
    *,
    adversarial_inputs: Mapping[float, Tensor] | None = None,
    **kwargs,
) -> RobustnessCurve:
    """``estimate_bound`` at each eps in ``epsilons`` (same keyword arguments; a ``threat=`` gives the norm,
    normalisation and bounds, its radius replaced by each eps).

    ``adversarial_inputs`` maps an eps to PGD examples already found for the
    loader's samples (see ``estimate_bound``); the other eps run the attack.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> encoder = nn.Flatten(); head = nn.Linear(16, 2)
        >>> data = [(torch.rand(8, 1, 4, 4), torch.randint(0, 2, (8,)))]
        >>> curve = robustness_curve(encoder, head, data, [0.0, 0.1], steps=3)
        >>> curve.epsilons
        [0.0, 0.1]
    """
    if "epsilon" in kwargs:
        raise TypeError("robustness_curve takes epsilons, not epsilon")
    if isinstance(epsilons, (int, float)) or len(epsilons) == 0:
        raise ValueError(f"epsilons must be a non-empty sequence of floats, got {epsilons!r}")
    found = dict(adversarial_inputs or {})
    reused = lambda eps: next((v for e, v in found.items() if math.isclose(e, eps)), None)  # noqa: E731
    threat = kwargs.pop("threat", None)
    radius = lambda eps: {"epsilon": eps} if threat is None else {"threat": replace(threat, epsilon=eps)}  # noqa: E731
    reports = tuple(
        estimate_bound(encoder, head, loader, **radius(eps), adversarial_inputs=reused(eps), **kwargs)
        for eps in epsilons
    )
    return RobustnessCurve(reports)
