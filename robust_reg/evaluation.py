"""Rigorous downstream robustness evaluation: attacks as specs, a per-sample worst case, sanity checks.

The protocol of the robust-SSL literature: freeze the encoder, fit a linear
probe on clean features, attack ``head(encoder(x))``. Attacks are small spec
objects composed in a list: ``PGD`` (this package's attack engine),
``AutoAttack`` (Croce & Hein 2020, through torchattacks' maintained
implementation, the optional ``autoattack`` extra) and the black-box
``Square``. Each produces a per-sample record of which samples it failed
to break.

The headline number is ``RobustnessEvaluation.robust_accuracy``: as in
AutoAttack's standard protocol, a sample counts as robust at an eps only if it
is classified correctly clean *and* under every attack run at that eps (on the
samples all of them attacked). Per-attack accuracies stay available as detail.

Every evaluation runs the gradient-masking checks of
``robust_reg.sanity_checks`` and flags a failure loudly.

All attack accuracies are estimates: an attack finds adversarial examples, it
does not prove none exist, so they are upper estimates of true robust accuracy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import module_device, progress
from .attacks import ThreatModel, _check_step_size, _check_steps, check_radius, pgd_attack, resolve_threat
from .sanity_checks import (
    SanityCheck,
    gradients_are_nonzero,
    outputs_are_deterministic,
    outputs_are_logits,
    standard_checks,
)

__all__ = [
    "PGD",
    "AutoAttack",
    "Square",
    "AttackAccuracy",
    "SanityCheck",
    "RobustnessEvaluation",
    "evaluate_robustness",
    "LinearProbeClassifier",
]


def _check_samples(samples: int | None) -> None:
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise ValueError(f"samples must be None or an int >= 1, got {samples!r}")


@dataclass(frozen=True)
class _Context:
    """What every attack run shares."""

    num_classes: int
    batch_size: int
    seed: int
    progress_bar: bool


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent with a random start (Madry et al. 2018), this package's engine.

    Args:
        steps: Ascent steps (``PGD(20)`` is "PGD-20").
        step_size: Step length, in the units of eps (default ``2.5 * eps / steps``).
        samples: Attack only the first samples (``None``: all).
    """

    steps: int = 20
    step_size: float | None = None
    samples: int | None = None

    def __post_init__(self) -> None:
        _check_steps(self.steps)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 for an attack, got {self.steps}")
        _check_step_size(self.step_size)
        _check_samples(self.samples)

    @property
    def name(self) -> str:
        return f"PGD-{self.steps}"

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, ctx: _Context) -> Tensor:
        """Adversarial inputs (model space) for ``x``."""
        chunks = range(0, x.shape[0], ctx.batch_size)
        out = []
        for i in progress(chunks, enabled=ctx.progress_bar, desc=f"{self.name} eps={threat.epsilon:.3g}"):
            xb, yb = x[i : i + ctx.batch_size], y[i : i + ctx.batch_size]
            out.append(pgd_attack(model, xb, yb, threat, steps=self.steps, step_size=self.step_size))
        return torch.cat(out)


class _PixelModel(nn.Module):
    """Takes ``[0, 1]`` pixels (torchattacks' convention, whatever ``bounds`` are), maps them to the declared
    range, normalises them and casts them to the model's input dtype."""

    def __init__(self, model: nn.Module, threat: ThreatModel, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.threat = threat
        self.dtype = dtype

    def to_unit(self, x: Tensor) -> Tensor:
        """Model-space inputs as ``[0, 1]`` pixels (float32 for half-precision inputs)."""
        lo, hi = self.threat.bounds
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return ((self.threat.to_pixels(x) - lo) / (hi - lo)).clamp(0, 1).contiguous()

    def to_model(self, unit: Tensor) -> Tensor:
        lo, hi = self.threat.bounds
        return self.threat.to_model(lo + unit * (hi - lo))

    def forward(self, unit: Tensor) -> Tensor:
        return self.model(self.to_model(unit).to(self.dtype))


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        return None
    return torchattacks


class _TorchattacksSpec:
    """Shared run loop of the torchattacks-backed specs: pixels in, model-space adversarial inputs out."""

    samples: int | None
    required: bool
    name: str

    def _build(self, ta, pixel_model: nn.Module, threat: ThreatModel, ctx: _Context):
        raise NotImplementedError

    def run(self, model: nn.Module, x: Tensor, y: Tensor, threat: ThreatModel, ctx: _Context) -> Tensor:
        pixel_model = _PixelModel(model, threat, x.dtype).eval()
        attack = self._build(_torchattacks(), pixel_model, threat, ctx)
        chunks = range(0, x.shape[0], ctx.batch_size)
        out = []
        for i in progress(chunks, enabled=ctx.progress_bar, desc=f"{self.name} eps={threat.epsilon:.3g}"):
            # torchattacks reshapes with .view (FAB): it needs contiguous inputs, whatever layout the caller uses.
            xb = x[i : i + ctx.batch_size]
            unit = attack(pixel_model.to_unit(xb), y[i : i + ctx.batch_size])
            out.append(threat._cast_like(pixel_model.to_model(unit), xb))
        return torch.cat(out)


@dataclass(frozen=True)
class AutoAttack(_TorchattacksSpec):
    """AutoAttack (APGD-CE, APGD-T, FAB-T, Square), torchattacks' implementation.

    Args:
        version: AutoAttack version (``"standard"``).
        samples: Attack only the first samples (``None``: all); it is the costly one.
        required: Without torchattacks, raise (``True``) or report it skipped (``False``).
    """

    version: str = "standard"
    samples: int | None = None
    required: bool = True
    name = "AutoAttack"

    def __post_init__(self) -> None:
        _check_samples(self.samples)

    def _build(self, ta, pixel_model, threat, ctx):
        norm = "Linf" if threat.norm == "linf" else "L2"
        return ta.AutoAttack(
            pixel_model, norm=norm, eps=threat.epsilon, version=self.version, n_classes=ctx.num_classes, seed=ctx.seed
        )


@dataclass(frozen=True)
class Square(_TorchattacksSpec):
    """The black-box Square attack (Andriushchenko et al. 2020): no gradients, so masking cannot fool it.

    Args:
        queries: Query budget per sample.
        samples: Attack only the first samples (``None``: all).
        required: Without torchattacks, raise (``True``) or report it skipped (``False``).
    """

    queries: int = 1000
    samples: int | None = None
    required: bool = True
    name = "Square"

    def __post_init__(self) -> None:
        _check_samples(self.samples)
        if isinstance(self.queries, bool) or not isinstance(self.queries, int) or self.queries < 1:
            raise ValueError(f"queries must be an int >= 1, got {self.queries!r}")

    def _build(self, ta, pixel_model, threat, ctx):
        norm = "Linf" if threat.norm == "linf" else "L2"
        return ta.Square(
            pixel_model, norm=norm, eps=threat.epsilon, n_queries=self.queries, n_restarts=1, seed=ctx.seed
        )


Attack = PGD | AutoAttack | Square


class LinearProbeClassifier(nn.Module):
    """``head(flatten(encoder(x)))``: the downstream classifier that is attacked.

    The features are cast to the head's dtype, so a float32 probe (``fit_linear_probe`` fits in
    float32) sits on a bfloat16, float16 or float64 backbone as it is.

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
        features = self.encoder(x).flatten(start_dim=1)
        weight = next(self.head.parameters(), None)
        return self.head(features if weight is None else features.to(weight.dtype))


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


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@dataclass(frozen=True)
class RobustnessEvaluation:
    """Clean and attacked accuracy at several eps, the per-sample record, and the sanity checks.

    Attributes:
        norm: ``"linf"`` or ``"l2"``.
        num_samples: Test samples evaluated clean and with the main PGD.
        clean_accuracy: Accuracy on clean inputs.
        epsilons: The reported eps (the sanity checks' large eps is not among them).
        num_classes: Number of classes of the task.
        results: Every attack's accuracy (estimates), one per attack and eps.
        checks: The gradient-masking sanity checks.
        skipped: Attacks that did not run, with the reason.
    """

    norm: str
    num_samples: int
    clean_accuracy: float
    results: tuple[AttackAccuracy, ...]
    checks: tuple[SanityCheck, ...]
    skipped: tuple[str, ...] = field(default=())
    epsilons: tuple[float, ...] = field(default=())
    num_classes: int = 0
    _correct: dict = field(default_factory=dict, repr=False, compare=False)
    _adversarial: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        """Whether every sanity check passed."""
        return all(c.passed for c in self.checks)

    def accuracy(self, attack: str, epsilon: float) -> float | None:
        """Accuracy of ``attack`` (e.g. ``"PGD-20"``, ``"AutoAttack"``, ``"Square"``) at ``epsilon``."""
        return next((r.accuracy for r in self.results if r.attack == attack and _close(r.epsilon, epsilon)), None)

    def correct(self, attack: str, epsilon: float) -> Tensor | None:
        """Per-sample correctness under ``attack`` at ``epsilon`` (``"clean"``: on clean inputs), CPU bools."""
        if attack == "clean":
            return self._correct.get(("clean", None))
        return next(
            (v for (a, e), v in self._correct.items() if a == attack and e is not None and _close(e, epsilon)), None
        )

    def _recorded(self, attack: str, epsilon: float) -> Tensor:
        """``correct`` of an attack that ran (its record exists)."""
        correct = self.correct(attack, epsilon)
        if correct is None:
            raise KeyError(f"no per-sample record of {attack} at eps {epsilon:g}")
        return correct

    def adversarial_inputs(self, attack: str, epsilon: float) -> Tensor | None:
        """The adversarial inputs an attack found (kept with ``keep_adversarial=True``), model space, CPU."""
        return next((v for (a, e), v in self._adversarial.items() if a == attack and _close(e, epsilon)), None)

    def worst_case(self, epsilon: float, attacks: Sequence[str] | None = None) -> AttackAccuracy | None:
        """Per-sample worst case at ``epsilon``: correct clean and under every attack (or those named).

        Taken on the samples every one of those attacks attacked (the first ones).
        ``None`` if no such attack ran at ``epsilon``.
        """
        rows = [r for r in self.results if _close(r.epsilon, epsilon) and (attacks is None or r.attack in attacks)]
        if not rows:
            return None
        m = min(r.num_samples for r in rows)
        robust = self._recorded("clean", epsilon)[:m].clone()
        for r in rows:
            robust &= self._recorded(r.attack, r.epsilon)[:m]
        name = "worst of " + ", ".join(r.attack for r in rows)
        return AttackAccuracy(name, epsilon, robust.float().mean().item(), m)

    def robust_accuracy(self, epsilon: float, attacks: Sequence[str] | None = None) -> float | None:
        """The headline number: the fraction of samples no attack broke at ``epsilon`` (see ``worst_case``)."""
        worst = self.worst_case(epsilon, attacks)
        return None if worst is None else worst.accuracy

    def to_dict(self) -> dict:
        return {
            "norm": self.norm,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": [asdict(w) for w in (self.worst_case(e) for e in self.epsilons) if w is not None],
            "results": [asdict(r) for r in self.results],
            "checks": [asdict(c) for c in self.checks],
            "skipped": list(self.skipped),
            "passed": self.passed,
        }

    def __str__(self) -> str:
        attacks = list(dict.fromkeys(r.attack for r in self.results))
        head = f"{'eps':>8} {'robust (n)':>16} " + " ".join(f"{a:>12}" for a in attacks)
        lines = [
            f"Robustness evaluation ({self.norm}, {self.num_samples} samples): clean accuracy "
            f"{100 * self.clean_accuracy:.2f} %",
            head,
            "-" * len(head),
        ]
        for eps in sorted({r.epsilon for r in self.results}):
            worst = self.worst_case(eps) if any(_close(eps, e) for e in self.epsilons) else None
            robust = "" if worst is None else f"{100 * worst.accuracy:.2f}% ({worst.num_samples})"
            cells = [
                f"{'':>12}" if (a := self.accuracy(name, eps)) is None else f"{100 * a:>11.2f}%" for name in attacks
            ]
            lines.append(f"{eps:>8.4g} {robust:>16} " + " ".join(cells))
        lines.append(
            "robust: per-sample worst case over clean and every attack at that eps, on the samples all of them "
            "attacked; attack accuracies are estimates (upper estimates of robust accuracy)"
        )
        lines += [f"skipped: {s}" for s in self.skipped]
        for c in self.checks:
            mark = ("ok  " if c.ran else "n/a ") if c.passed else "!!! SANITY CHECK FAILED:"
            lines.append(f"{mark} {c.name}: {c.detail}")
        if not self.passed:
            lines.append(
                "!!! One or more gradient-masking checks failed: treat the robust accuracies above as suspect."
            )
        return "\n".join(lines)


def _predict_correct(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    with torch.no_grad():
        return torch.cat(
            [model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size] for i in range(0, len(x), batch_size)]
        )


def default_attacks() -> list:
    """PGD-20, then AutoAttack and Square when torchattacks is installed (else reported skipped)."""
    return [PGD(20), AutoAttack(required=False), Square(required=False)]


def _available(attacks: Sequence) -> tuple[list, list[str]]:
    """The attacks that can run, and a reason for each that cannot; raises for a required one that cannot."""
    if not attacks or not all(isinstance(a, (PGD, AutoAttack, Square)) for a in attacks):
        raise TypeError(f"attacks must be a non-empty list of PGD, AutoAttack or Square specs, got {attacks!r}")
    names = [a.name for a in attacks]
    if len(set(names)) != len(names):
        raise ValueError(f"attacks must not repeat an attack, got {names}")
    if _torchattacks() is not None:
        return list(attacks), []
    needed = [a.name for a in attacks if isinstance(a, _TorchattacksSpec) and a.required]
    if needed:
        raise ImportError(f"{' and '.join(needed)} need torchattacks: pip install 'robust-reg[autoattack]'")
    runnable = [a for a in attacks if isinstance(a, PGD)]
    return runnable, [f"{a.name} (torchattacks not installed)" for a in attacks if not isinstance(a, PGD)]


class _Recorder:
    """Runs attacks on the test set once each and keeps the per-sample record."""

    def __init__(self, model, x, y, ctx: _Context, keep_adversarial: bool, log) -> None:
        self.model, self.x, self.y, self.ctx = model, x, y, ctx
        self.keep, self.log = keep_adversarial, log
        self.results: list[AttackAccuracy] = []
        self.correct: dict = {("clean", None): _predict_correct(model, x, y, ctx.batch_size).cpu()}
        self.adversarial: dict = {}
        self.clock = time.perf_counter()

    def evaluation(self, threats: list[ThreatModel], skipped: list[str]) -> RobustnessEvaluation:
        """What was recorded, without the sanity checks."""
        return RobustnessEvaluation(
            threats[0].norm,
            len(self.x),
            self.correct["clean", None].float().mean().item(),
            tuple(self.results),
            (),
            tuple(skipped),
            tuple(t.epsilon for t in threats),
            self.ctx.num_classes,
            self.correct,
            self.adversarial,
        )

    def run(self, attack, threat: ThreatModel) -> None:
        if any(r.attack == attack.name and _close(r.epsilon, threat.epsilon) for r in self.results):
            return  # the same attack at the same eps: never twice
        m = min(len(self.x), attack.samples or len(self.x))
        x_adv = attack.run(self.model, self.x[:m], self.y[:m], threat, self.ctx)
        correct = _predict_correct(self.model, x_adv, self.y[:m], self.ctx.batch_size).cpu()
        key = (attack.name, threat.epsilon)
        self.correct[key] = correct
        if self.keep:
            self.adversarial[key] = x_adv.detach().cpu()
        result = AttackAccuracy(attack.name, threat.epsilon, correct.float().mean().item(), m)
        self.results.append(result)
        if self.log is not None:
            now = time.perf_counter()
            self.log(
                f"  {attack.name} @{threat.epsilon:.4g}: {100 * result.accuracy:.1f} % on {m} samples "
                f"({now - self.clock:.0f} s)"
            )
            self.clock = now


def evaluate_robustness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epsilons: Sequence[float] | None = None,
    threat: ThreatModel | None = None,
    attacks: Sequence[Attack] | None = None,
    norm: str | None = None,
    check_steps: int = 100,
    large_epsilon: float | None = None,
    large_epsilon_max_accuracy: float = 0.02,
    num_classes: int | None = None,
    batch_size: int = 500,
    seed: int = 0,
    progress_bar: bool = False,
    log: Callable[[str], None] | None = None,
    keep_adversarial: bool = False,
    **deprecated: object,
) -> RobustnessEvaluation:
    """Attack a classifier with a list of attacks at each eps; the per-sample worst case; sanity checks.

    Each attack runs once per eps. For the checks, the first ``PGD`` of the
    list (the main one; PGD-20 if the list has none) also runs at a very large
    eps, and ``PGD(check_steps)`` at the largest eps unless the list already has
    it. All of them count towards ``RobustnessEvaluation.robust_accuracy``.

    Args:
        model: Maps inputs (model space) to logits; e.g. ``LinearProbeClassifier``.
        x: Test inputs in model space (normalised as ``threat`` says).
        y: Test labels.
        epsilons: Radii to evaluate, fractions of the pixel range (``8 / 255``) whatever ``bounds`` are
            (default with ``threat``: its radius alone).
        threat: The ball's norm, the inputs' normalisation (``mean``/``std``) and pixel range
            (``bounds``), as a ``ThreatModel``; its radius is replaced by each of ``epsilons``.
        attacks: Attack specs, e.g. ``[PGD(20), AutoAttack(samples=200), Square(queries=1000)]``.
            Default: ``default_attacks`` (AutoAttack and Square only if torchattacks is installed).
        norm: Without ``threat``: ``"linf"`` (default) or ``"l2"``.
        check_steps: Steps of the stronger PGD of the "more steps" check.
        large_epsilon: The eps at which accuracy must fall to about 0 (default:
            the whole valid range, 1.0 for L-inf, ``sqrt(d)`` for L2).
        large_epsilon_max_accuracy: The largest accuracy that counts as "about 0".
        num_classes: Number of classes (default: ``y.max() + 1``).
        batch_size: Samples per attack batch.
        seed: Seed of the attacks' randomness (the caller's RNG state, CPU and CUDA, is left as it was).
        progress_bar: Show progress bars.
        log: Called with one line per finished attack (accuracy, samples, seconds), e.g. ``print``.
        keep_adversarial: Keep every attack's adversarial inputs (``adversarial_inputs``), e.g. for
            ``estimate_bound`` to reuse.
        **deprecated: 0.2's ``mean``, ``std``, ``bounds`` (use ``threat``), with a
            ``DeprecationWarning`` until 0.4.0.

    Returns:
        A ``RobustnessEvaluation``; ``print`` it for a table that flags failed checks.

    Raises:
        ImportError: If a required AutoAttack or Square spec is given without torchattacks.
        ValueError: For bad ``epsilons``, ``norm``, steps, or inputs outside ``bounds``.
        TypeError: For an ``attacks`` entry that is not an attack spec.

    Examples:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 2, (64,))
        >>> ev = evaluate_robustness(model, x, y, epsilons=[0.1], attacks=[PGD(5)], check_steps=10)
        >>> ev.robust_accuracy(0.1) <= ev.accuracy("PGD-5", 0.1) <= ev.clean_accuracy
        True
    """
    legacy = {k: deprecated.pop(k) for k in ("mean", "std", "bounds") if k in deprecated}
    threats = _threats(epsilons, threat, norm, legacy)
    if deprecated:  # 0.1.0's attack flags (pgd_steps=, autoattack=, ...) went in 0.3.0: pass attacks=
        raise TypeError(f"evaluate_robustness() got unexpected keyword argument(s) {', '.join(sorted(deprecated))}")
    attacks = default_attacks() if attacks is None else attacks
    runnable, skipped = _available(attacks)
    strong = PGD(_check_steps(check_steps, "check_steps")) if check_steps >= 1 else None
    main = next((a for a in runnable if isinstance(a, PGD)), PGD(20))
    _check_data(x, y, threats)
    strongest = max(threats, key=lambda t: t.epsilon)
    x, y = x.to(module_device(model)), y.to(module_device(model)).long()
    ctx = _Context(_check_labels_fit(model, x, y, num_classes), batch_size, seed, progress_bar)
    if large_epsilon is None:  # the whole range: a fraction 1 of it (L-inf), the box's diagonal (L2)
        large_epsilon = 1.0 if threats[0].norm == "linf" else math.sqrt(x[0].numel())
    big = threats[0]._with_epsilon(float(large_epsilon))
    if log is not None:
        log(_plan(runnable, threats, strong, strongest, main, big, len(x)))
    # torch.manual_seed reseeds every CUDA device too: fork all of them, so the caller's state survives.
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices), preserved_state(model, eval_mode=True):
        torch.manual_seed(seed)
        record = _Recorder(model, x, y, ctx, keep_adversarial, log)
        for attack, threat in [(a, t) for a in runnable for t in threats] + [(strong, strongest), (main, big)]:
            if attack is not None:
                record.run(attack, threat)
        model_checks = _model_checks(model, x[:batch_size], y[:batch_size])
    ev = record.evaluation(threats, skipped)
    checks = standard_checks(
        ev,
        main=main.name,
        strong=strong.name if strong is not None else main.name,
        strongest_epsilon=strongest.epsilon,
        large_epsilon=big.epsilon,
        large_epsilon_max_accuracy=large_epsilon_max_accuracy,
        blackbox=["Square"],
    )
    return replace(ev, checks=tuple(checks + model_checks))


def _threats(epsilons: Sequence[float] | None, threat: ThreatModel | None, norm, legacy: dict) -> list[ThreatModel]:
    """One threat model per reported eps, each checked for a unit mistake (named ``epsilons``)."""
    if epsilons is None and threat is not None:
        epsilons = [threat.epsilon]
    if epsilons is None or isinstance(epsilons, (int, float)) or len(epsilons) == 0:
        raise ValueError(f"epsilons must be a non-empty sequence of floats, got {epsilons!r}")
    kind = threat.norm if isinstance(threat, ThreatModel) else norm or "linf"
    for eps in epsilons:
        if isinstance(eps, (int, float)) and not isinstance(eps, bool) and isinstance(kind, str):
            check_radius(float(eps), kind.lower(), "epsilons")
    first = None if threat is not None else epsilons[0]
    base = resolve_threat(threat, first, norm, legacy, where="evaluate_robustness", stacklevel=4)
    return [replace(base, epsilon=eps) for eps in epsilons]


def _check_data(x: Tensor, y: Tensor, threats: list[ThreatModel]) -> None:
    """The batch against every reported ball (``ThreatModel``'s checks), before any attack."""
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    for threat in threats[1:]:
        threat.check_size(x, "epsilons")
    threats[0].check_inputs(x, "x", epsilon_name="epsilons")


def _check_labels_fit(model: nn.Module, x: Tensor, y: Tensor, num_classes: int | None) -> int:
    """The number of classes: the model's logits, checked against ``y`` and ``num_classes`` before any attack."""
    with torch.no_grad(), preserved_state(model, eval_mode=True):
        logits = model(x[:2])
    if logits.dim() != 2:
        raise ValueError(f"model must return logits of shape (N, K), got {tuple(logits.shape)}")
    k = logits.shape[1]
    low, high = (int(v) for v in torch.stack([y.min(), y.max()]).tolist())
    if low < 0 or high >= k:
        hint = f" (labels 1..{k}? subtract 1)" if (low, high) == (1, k) else ""
        raise ValueError(
            f"y has labels in [{low}, {high}] but the model outputs {k} logits: labels must be class indices in "
            f"[0, {k - 1}]{hint}"
        )
    if num_classes is not None and num_classes != k:
        raise ValueError(f"num_classes={num_classes} but the model outputs {k} logits")
    return k


def _plan(runnable, threats, strong, strongest, main, big, n: int) -> str:
    """What the evaluation will run, printed before it starts: the checks' attacks cost as much as the rest."""

    def on(attack) -> str:
        return f"{min(n, attack.samples or n)}"

    eps = ", ".join(f"{t.epsilon:.4g}" for t in threats)
    parts = []
    for attack in runnable:
        what = f"{attack.name} ({attack.queries} queries)" if isinstance(attack, Square) else attack.name
        parts.append(f"{what} on {on(attack)} samples at eps {eps}")
    checks = [f"{main.name} at eps {big.epsilon:.4g} (the whole range) on {on(main)}"]
    if strong is not None and strong.steps != main.steps:
        checks.insert(0, f"{strong.name} at eps {strongest.epsilon:.4g} on {on(strong)}")
    return f"  evaluation plan: {'; '.join(parts)}; sanity checks: {'; '.join(checks)}"


def _model_checks(model: nn.Module, x: Tensor, y: Tensor) -> list[SanityCheck]:
    """The checks on the model itself: deterministic outputs, logits, non-zero input gradients."""
    return [outputs_are_deterministic(model, x), outputs_are_logits(model, x), gradients_are_nonzero(model, x, y)]
