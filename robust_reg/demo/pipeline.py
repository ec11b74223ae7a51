"""Pretrain -> linear probe -> attack: the evaluation pipeline shared by the CLI, examples and benchmarks."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..bound import BoundReport, RobustnessCurve, robustness_curve
from ..corruptions import CorruptionAccuracy, corruption_accuracy
from ..embedding_attack import EmbeddingAttack, embedding_attack
from ..evaluation import PGD, AutoAttack, LinearProbeClassifier, RobustnessEvaluation, Square, evaluate_robustness
from ..finetune import (
    AFF_CPU,
    AFF_PAPER,
    ALF_CPU,
    ALF_PAPER,
    FinetuneSchedule,
    adversarial_finetune,
    fit_adversarial_linear_probe,
)
from ..probe import extract_features, fit_linear_probe
from .data import CIFAR10_CLASSES, DATASET_KINDS, KINDS, ImageData, batches

PROTOCOLS = ("slf", "alf", "aff")
FINETUNE_SCHEDULES = {"cpu": {"alf": ALF_CPU, "aff": AFF_CPU}, "paper": {"alf": ALF_PAPER, "aff": AFF_PAPER}}


@dataclass
class EvalConfig:
    """How a pretrained encoder is evaluated downstream.

    Attributes:
        epsilons: The eps at which PGD, AutoAttack and Square are reported (pixel units).
        curve_epsilons: The eps grid of the robustness curve and bound.
        norm: ``linf`` or ``l2``.
        pgd_steps: Steps of the PGD attack (and of the bound's deviation ascent).
        check_steps: Steps of the stronger PGD of the "more steps" sanity check.
        autoattack: Run AutoAttack (``None``: when torchattacks is installed).
        autoattack_samples: Test samples attacked with AutoAttack (``None``: all).
        square_samples: Test samples attacked with Square (``None``: all).
        square_queries: Square's query budget.
        test_samples: Test samples used (``None``: all).
        curve_samples: Test samples of the robustness curve (``None``: all).
        probe_weight_decay: L2 penalty of the linear probe (the same for every method).
        label_sets: Downstream tasks on the same test images, each with its own probe
            (see ``label_sets``); the first is the dataset's own labels and gets
            the full evaluation, the others clean and PGD accuracy.
        protocols: Fine-tuning modes scored with the full attack list on the first label set:
            ``slf`` (the linear probe, always run), ``alf`` (adversarially trained head on the
            frozen encoder), ``aff`` (TRADES on encoder and head); see ``robust_reg.finetune``.
        finetune_schedule: ``cpu`` (short, the default) or ``paper`` (the DynACL authors' 25 epochs).
        finetune_epochs: Override the schedule's epochs (its learning-rate milestones scale with them).
        corruptions: Score each mode on CIFAR-10-C-style corruptions of the test images.
        embedding_attack: Run the label-free embedding attack on the encoder (and its k-NN reading).
        knn_k: Neighbours of the k-NN reading.
    """

    epsilons: tuple[float, ...] = (0.05, 0.1)
    curve_epsilons: tuple[float, ...] = (0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2)
    norm: str = "linf"
    pgd_steps: int = 20
    check_steps: int = 100
    autoattack: bool | None = None
    autoattack_samples: int | None = 500
    square_samples: int | None = 500
    square_queries: int = 1000
    test_samples: int | None = None
    curve_samples: int | None = 500
    probe_weight_decay: float = 1e-4
    label_sets: tuple[str, ...] = ("class", "parity", "class>=5")
    protocols: tuple[str, ...] = ("slf",)
    finetune_schedule: str = "cpu"
    finetune_epochs: int | None = None
    corruptions: bool = True
    embedding_attack: bool = True
    knn_k: int = 20

    def __post_init__(self) -> None:
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ValueError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {self.protocols!r}")
        if self.finetune_schedule not in FINETUNE_SCHEDULES:
            raise ValueError(
                f"finetune_schedule must be one of {tuple(FINETUNE_SCHEDULES)}, got {self.finetune_schedule!r}"
            )

    def schedule(self, mode: str) -> FinetuneSchedule:
        """The fine-tuning schedule of ``alf`` or ``aff``, with ``finetune_epochs`` applied."""
        base = FINETUNE_SCHEDULES[self.finetune_schedule][mode]
        if self.finetune_epochs is None:
            return base
        n = self.finetune_epochs
        milestones = tuple(sorted({max(1, min(n, round(m * n / base.epochs))) for m in base.milestones}))
        return replace(base, epochs=n, milestones=milestones)

    def attacks(self) -> list:
        """The attack specs: PGD, then AutoAttack and Square (``autoattack=None``: if torchattacks is installed)."""
        required = self.autoattack is True
        specs: list = [PGD(self.pgd_steps)]
        if self.autoattack is not False:
            specs += [
                AutoAttack(samples=self.autoattack_samples, required=required),
                Square(self.square_queries, self.square_samples, required=required),
            ]
        return specs

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> EvalConfig:
        """The usual protocol of a data kind (or a named dataset's kind): eps 8/255 L-inf on natural images,
        0.1 on digits (0.05 on sklearn's 8x8 ones), and the kind's label sets."""
        kind = DATASET_KINDS.get(dataset, dataset)
        if kind not in KINDS:
            raise ValueError(f"dataset must be a dataset name or one of the kinds {KINDS}, got {dataset!r}")
        base: dict[str, Any] = {"label_sets": LABEL_SETS[kind]}
        if kind != "digits":
            base.update(
                epsilons=(4 / 255, 8 / 255), curve_epsilons=(0.0, 2 / 255, 4 / 255, 8 / 255, 12 / 255, 16 / 255)
            )
        elif dataset == "digits":
            base.update(epsilons=(0.05, 0.1), curve_epsilons=(0.0, 0.05, 0.1, 0.15, 0.2))
        return cls(**{**base, **overrides})

    @classmethod
    def for_data(cls, data: ImageData, **overrides: Any) -> EvalConfig:
        """``for_dataset`` of a loaded dataset: its name's protocol, else its kind's (an ``npz`` file)."""
        return cls.for_dataset(data.name if data.name in DATASET_KINDS else data.kind, **overrides)


@dataclass
class EncoderEvaluation:
    """Everything measured on one encoder.

    Attributes:
        robustness: Clean, PGD, AutoAttack and Square accuracy with the sanity checks.
        curve: Bound reports over ``curve_epsilons`` (PGD accuracy, adversarial loss, bound).
        main_epsilon: The largest of the reported eps; ``bound`` is taken there.
        head: The fitted linear probe.
        tasks: Per label set, the robustness of its own probe (the first is ``robustness``).
        protocols: Per fine-tuning mode (``slf`` is ``robustness``), the first label set's evaluation.
        protocol_seconds: Per mode, the seconds its fine-tuning took (``slf``: the probe fit).
        corruptions: Per mode, the accuracy on corrupted test images.
        embedding: The label-free embedding attack at ``main_epsilon``.
        knn_changed: The fraction of test samples whose k-NN prediction the embedding attack changed.
    """

    robustness: RobustnessEvaluation
    curve: RobustnessCurve
    main_epsilon: float
    head: nn.Linear = field(repr=False)
    tasks: dict[str, RobustnessEvaluation] = field(default_factory=dict, repr=False)
    protocols: dict[str, RobustnessEvaluation] = field(default_factory=dict, repr=False)
    protocol_seconds: dict[str, float] = field(default_factory=dict, repr=False)
    corruptions: dict[str, CorruptionAccuracy] = field(default_factory=dict, repr=False)
    embedding: EmbeddingAttack | None = field(default=None, repr=False)
    knn_changed: float | None = None

    def protocols_summary(self) -> str:
        """One row per fine-tuning mode: clean, robust (per-sample worst case) at each eps, corruptions, cost."""
        epsilons = self.robustness.epsilons
        head = f"{'mode':<5} {'clean':>7} " + " ".join(f"{'robust @' + format(e, '.4g'):>15}" for e in epsilons)
        head += f" {'corruptions':>12} {'fine-tune':>10}"
        lines = [head, "-" * len(head)]
        for mode, ev in self.protocols.items():
            cells = [f"{'n/a' if (r := ev.robust_accuracy(e)) is None else f'{100 * r:.1f} %':>15}" for e in epsilons]
            corr = self.corruptions.get(mode)
            corr_cell = "n/a" if corr is None else f"{100 * corr.mean_accuracy:.1f} %"
            lines.append(
                f"{mode:<5} {100 * ev.clean_accuracy:>6.1f}% "
                + " ".join(cells)
                + f" {corr_cell:>12} {self.protocol_seconds.get(mode, 0.0):>8.0f} s"
            )
        lines.append("robust: per-sample worst case over clean and every attack (estimates); fine-tune: seconds")
        if self.embedding is not None:
            lines.append(str(self.embedding))
            if self.knn_changed is not None:
                lines.append(f"k-NN predictions changed by that attack: {100 * self.knn_changed:.1f} % of test samples")
        return "\n".join(lines)

    def task_robust_accuracy(self, epsilon: float) -> dict[str, float | None]:
        """Per label set, the per-sample worst case over clean and the main PGD at ``epsilon`` (all test samples).

        One protocol for every task, so the tasks compare; the first task's full
        worst case (with AutoAttack and Square) is ``robustness.robust_accuracy``.
        """
        return {name: ev.robust_accuracy(epsilon, attacks=[_main_pgd(ev)]) for name, ev in self.tasks.items()}

    def tasks_summary(self) -> str:
        """One line per reported eps: each label set's robust accuracy (clean + main PGD) and the worst."""
        lines = []
        for eps in self.robustness.epsilons:
            scores = self.task_robust_accuracy(eps)
            worst = self.worst_task(eps)
            cells = ", ".join(f"{k} {'n/a' if v is None else f'{100 * v:.1f} %'}" for k, v in scores.items())
            lines.append(
                f"label sets @{eps:g} (each its own probe; worst case of clean and PGD): {cells}"
                + (f" -> worst: {worst[0]}" if worst else "")
            )
        return "\n".join(lines)

    def worst_task(self, epsilon: float) -> tuple[str, float] | None:
        """The label set whose probe is least robust at ``epsilon``, and its robust accuracy."""
        scores = {k: v for k, v in self.task_robust_accuracy(epsilon).items() if v is not None}
        return min(scores.items(), key=lambda kv: kv[1]) if scores else None

    @property
    def bound(self) -> BoundReport:
        """The bound report at ``main_epsilon``."""
        return min(self.curve.reports, key=lambda r: abs(r.epsilon - self.main_epsilon))

    def to_dict(self) -> dict:
        epsilons = self.robustness.epsilons
        return {
            "robustness": self.robustness.to_dict(),
            "curve": self.curve.to_dict(),
            "main_epsilon": self.main_epsilon,
            "bound": self.bound.to_dict(),
            "tasks": {
                name: {
                    "num_classes": ev.num_classes,
                    "clean_accuracy": ev.clean_accuracy,
                    "robust_accuracy": {f"{e:g}": ev.robust_accuracy(e, attacks=[_main_pgd(ev)]) for e in epsilons},
                    "passed": ev.passed,
                }
                for name, ev in self.tasks.items()
            },
            "protocols": {
                mode: {
                    "seconds": self.protocol_seconds.get(mode),
                    "robustness": ev.to_dict(),
                    "corruptions": None if mode not in self.corruptions else self.corruptions[mode].to_dict(),
                }
                for mode, ev in self.protocols.items()
            },
            "embedding_attack": None
            if self.embedding is None
            else {
                **self.embedding.to_dict(),
                "knn_changed": self.knn_changed,
            },
        }


def _main_pgd(ev: RobustnessEvaluation) -> str:
    return next(r.attack for r in ev.results if r.attack.startswith("PGD-"))


# Each kind's downstream tasks on the same images (the first: the dataset's own labels, fully evaluated).
LABEL_SETS = {
    "digits": ("digit", "parity", "digit>=5"),
    "cifar10": ("class", "animal-vs-vehicle", "coarse4"),
    "natural": ("class",),
}
_VEHICLES = ("airplane", "automobile", "ship", "truck")
# coarse4: land vehicles, other vehicles, mammals, other animals.
_COARSE4 = {"automobile": 0, "truck": 0, "airplane": 1, "ship": 1, "cat": 2, "deer": 2, "dog": 2, "horse": 2}


def _cifar_map(groups: dict[str, int], default: int) -> torch.Tensor:
    return torch.tensor([groups.get(c, default) for c in CIFAR10_CLASSES])


def label_sets(data: ImageData, names: tuple[str, ...]) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """Label sets of the same images, as ``(y_train, y_test, num_classes)``.

    ``class`` (the dataset's labels; ``digit`` on digits), ``parity`` (label mod 2) and ``class>=5``
    (``digit>=5``) on digits; on CIFAR-10's classes ``animal-vs-vehicle`` (2 classes) and ``coarse4``
    (land vehicles: automobile, truck; other vehicles: airplane, ship; mammals: cat, deer, dog,
    horse; other animals: bird, frog).
    """
    vehicle = _cifar_map(dict.fromkeys(_VEHICLES, 1), 0)
    makers = {
        "class": lambda y: (y, data.num_classes),
        "parity": lambda y: (y % 2, 2),
        "class>=5": lambda y: ((y >= 5).long(), 2),
        "animal-vs-vehicle": lambda y: (vehicle[y], 2),
        "coarse4": lambda y: (_cifar_map(_COARSE4, 3)[y], 4),
    }
    makers.update(digit=makers["class"], **{"digit>=5": makers["class>=5"]})  # the same sets, named for digits
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise ValueError(f"label_sets must be among {tuple(makers)}, got {unknown}")
    cifar_only = [n for n in names if n in ("animal-vs-vehicle", "coarse4") and data.kind != "cifar10"]
    if cifar_only:
        raise ValueError(f"label sets {cifar_only} group CIFAR-10's classes; {data.name} is of kind {data.kind!r}")
    sets = {}
    for name in names:
        (train, k), (test, _) = makers[name](data.y_train), makers[name](data.y_test)
        sets[name] = (train, test, k)
    return sets


def fixed_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> list:
    """``(x, y)`` in batches of ``batch_size``, in order (a loader for features, probes and curves)."""
    return list(batches(x, y, batch_size, shuffle=False))


def evaluate_encoder(
    encoder: nn.Module,
    data: ImageData,
    config: EvalConfig | None = None,
    *,
    device: str | torch.device | None = None,
    progress_bar: bool = False,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> EncoderEvaluation:
    """Fit a linear probe on clean training features, then attack ``probe(encoder(x))`` on the test set.

    Then, as ``config`` asks: the other fine-tuning modes (ALF, AFF) on the first
    label set, each attacked the same way; every mode on corrupted test images;
    the label-free embedding attack. ``log`` receives one line per finished stage
    (probe, each attack, the curve, each mode), whatever ``progress_bar``.
    """
    config = config or EvalConfig.for_data(data)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder = encoder.to(device).eval()
    sets = label_sets(data, config.label_sets or ("class",))
    tasks: dict[str, RobustnessEvaluation] = {}
    heads: dict[str, nn.Linear] = {}
    fit_seconds: dict[str, float] = {}
    for i, (name, labels) in enumerate(sets.items()):
        # The first label set gets the full attack list; the others the main PGD (their own probes' checks run).
        heads[name], tasks[name], fit_seconds[name] = _probe_and_attack(
            encoder,
            data,
            name,
            labels,
            config,
            full=i == 0,
            device=device,
            progress_bar=progress_bar,
            seed=seed,
            log=log,
        )
    first = next(iter(tasks))
    curve = _bound_curve(encoder, heads[first], tasks[first], data, sets[first][1], config, device, progress_bar, log)
    ev = EncoderEvaluation(tasks[first], curve, max(config.epsilons), heads[first], tasks)
    ev.protocols["slf"], ev.protocol_seconds["slf"] = tasks[first], fit_seconds[first]
    _other_protocols(ev, encoder, data, sets[first], config, device=device, seed=seed, log=log)
    return ev


def _probe_and_attack(
    encoder: nn.Module,
    data: ImageData,
    name: str,
    labels: tuple[torch.Tensor, torch.Tensor, int],
    config: EvalConfig,
    *,
    full: bool,
    device: torch.device,
    progress_bar: bool,
    seed: int,
    log: Callable[[str], None] | None,
) -> tuple[nn.Linear, RobustnessEvaluation, float]:
    """One label set: its linear probe on clean training features (and the fit's seconds), then its attacks."""
    y_train, y_test, k = labels
    start = time.perf_counter()
    head = fit_linear_probe(
        encoder,
        fixed_batches(data.x_train, y_train),
        k,
        weight_decay=config.probe_weight_decay,
        device=device,
        progress_bar=progress_bar,
    )
    seconds = time.perf_counter() - start
    if log is not None:
        log(f"  linear probe for '{name}' ({k} classes) fitted on {data.x_train.shape[0]} clean training samples")
    model = LinearProbeClassifier(encoder, head).eval()
    return head, _attack(model, data, y_test, k, config, full, seed, log, progress_bar), seconds


def _attack(model, data: ImageData, y_test, k: int, config: EvalConfig, full: bool, seed, log, progress_bar=False):
    """The evaluation of one downstream classifier: the full attack list, or the main PGD alone."""
    return evaluate_robustness(
        model,
        data.x_test[: config.test_samples],
        y_test[: config.test_samples],
        epsilons=config.epsilons,
        attacks=config.attacks() if full else [PGD(config.pgd_steps)],
        norm=config.norm,
        check_steps=config.check_steps if full else config.pgd_steps,
        num_classes=k,
        seed=seed,
        progress_bar=progress_bar,
        log=log,
        keep_adversarial=full,
    )


class ShuffledBatches:
    """Training batches in a fresh seeded order each pass, with the fine-tuning augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return batches(self.x, self.y, self.batch_size, shuffle=True, generator=self.generator)

    def __len__(self) -> int:
        return max(1, len(self.x) // self.batch_size)  # shuffled: the last partial batch is dropped


def crop_flip(flip: bool, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The papers' fine-tuning augmentation: a random crop after zero padding (4 px at 32 px), flips if ``flip``."""
    g = torch.Generator().manual_seed(seed)

    def augment(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        pad = max(1, h // 8)
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2, n), generator=g).tolist()
        out = torch.stack([padded[i, :, t : t + h, s : s + w] for i, (t, s) in enumerate(zip(top, left))])
        if flip:
            mirror = (torch.rand(n, generator=g) < 0.5).view(-1, 1, 1, 1).to(x.device)
            out = torch.where(mirror, out.flip(3), out)
        return out

    return augment


def _finetune(mode: str, encoder: nn.Module, data: ImageData, y_train, k: int, config: EvalConfig, device, seed: int):
    """The classifier a fine-tuning mode (``alf`` or ``aff``) builds on the encoder."""
    schedule = config.schedule(mode)
    common = dict(
        epsilon=max(config.epsilons),
        norm=config.norm,
        schedule=schedule,
        augment=crop_flip(flip=data.kind != "digits", seed=seed),  # digits are not mirror-symmetric
        device=device,
    )
    loader = ShuffledBatches(data.x_train, y_train, schedule.batch_size, seed)
    if mode == "alf":
        return LinearProbeClassifier(encoder, fit_adversarial_linear_probe(encoder, loader, k, **common)).eval()
    return adversarial_finetune(encoder, loader, k, **common)


def _other_protocols(ev: EncoderEvaluation, encoder, data: ImageData, labels, config: EvalConfig, *, device, seed, log):
    """ALF and AFF (as asked) on the first label set, every mode's corruption accuracy, the embedding attack."""
    y_train, y_test, k = labels
    models = {"slf": LinearProbeClassifier(encoder, ev.head).eval()}
    for mode in (m for m in config.protocols if m != "slf"):
        start = time.perf_counter()
        models[mode] = _finetune(mode, encoder, data, y_train, k, config, device, seed)
        ev.protocol_seconds[mode] = time.perf_counter() - start
        if log is not None:
            log(f"  {mode.upper()} ({config.finetune_schedule} schedule) trained in {ev.protocol_seconds[mode]:.0f} s")
        ev.protocols[mode] = _attack(models[mode], data, y_test, k, config, True, seed, log)
    x_test, y_test = data.x_test[: config.test_samples], y_test[: config.test_samples]
    if config.corruptions:
        for mode, model in models.items():
            ev.corruptions[mode] = corruption_accuracy(model, x_test, y_test, seed=seed)
        if log is not None:
            cells = ", ".join(f"{m} {100 * c.mean_accuracy:.1f} %" for m, c in ev.corruptions.items())
            log(f"  corruptions ({len(ev.corruptions['slf'].accuracies)} corruption x severity sets): {cells}")
    if config.embedding_attack:
        eps, steps = max(config.epsilons), config.pgd_steps
        x = x_test.to(device)
        ev.embedding = embedding_attack(encoder, x, epsilon=eps, norm=config.norm, steps=steps, seed=seed)
        train_features, _ = extract_features(encoder, fixed_batches(data.x_train, y_train), device=device)
        ev.knn_changed = ev.embedding.knn_changed(train_features.cpu(), y_train, k=min(config.knn_k, len(y_train)))
        if log is not None:
            log(f"  {ev.embedding}")


def _bound_curve(
    encoder: nn.Module,
    head: nn.Linear,
    robustness: RobustnessEvaluation,
    data: ImageData,
    y_test: torch.Tensor,
    config: EvalConfig,
    device: torch.device,
    progress_bar: bool,
    log: Callable[[str], None] | None,
) -> RobustnessCurve:
    """The bound over ``curve_epsilons`` (and the main eps) on the first ``curve_samples`` test samples."""
    m = config.curve_samples
    curve_epsilons = sorted(set(config.curve_epsilons) | {max(config.epsilons)})
    x_curve = data.x_test[: config.test_samples][:m]
    y_curve = y_test[: config.test_samples][:m]  # the first label set's, as its probe
    # The bound's PGD at a reported eps is the evaluation's own attack (same steps): reused, not re-run.
    pgd = f"PGD-{config.pgd_steps}"
    reused = {e: a[:m] for e in curve_epsilons if (a := robustness.adversarial_inputs(pgd, e)) is not None}
    curve = robustness_curve(
        encoder,
        head,
        fixed_batches(x_curve.to(device), y_curve.to(device)),
        curve_epsilons,
        norm=config.norm,
        steps=config.pgd_steps,
        progress_bar=progress_bar,
        adversarial_inputs=reused,
    )
    if log is not None:
        n = curve.reports[0].num_samples
        log(f"  bound curve at eps {', '.join(f'{e:g}' for e in curve_epsilons)} on the first {n} test samples")
    return curve


def device_name(device: torch.device) -> str:
    """A readable name of the machine a benchmark ran on (GPU model, or CPU model and thread count)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"
