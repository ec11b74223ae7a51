"""Adversarial fine-tuning modes of the robust-SSL literature: ALF and AFF.

The RobustSSL benchmark and the ACL / AdvCL / DynACL / DeACL papers score a
pretrained encoder three ways:

- **SLF**, standard linear fine-tuning: a linear head on the frozen encoder's
  clean features (``fit_linear_probe``).
- **ALF**, adversarial linear fine-tuning (``fit_adversarial_linear_probe``):
  the same head, trained on adversarial inputs crafted in pixel space through
  the frozen encoder (its BatchNorm in eval mode).
- **AFF**, adversarial full fine-tuning (``adversarial_finetune``): TRADES
  (Zhang et al. 2019, beta 6 as in the papers) on encoder and head together,
  starting from the pretrained weights.

Each takes a ``FinetuneSchedule``. The ``*_PAPER`` schedules are the
DynACL authors' finetuning settings (Luo, Wang and Wang, ICLR 2023: SGD with
momentum 0.9 and weight decay 2e-4, 25 epochs, PGD-10 with step 2/255 at
8/255); the ``*_CPU`` ones are shorter, for a small encoder on a CPU. Neither
touches the caller's encoder: ALF never updates it, and AFF trains a copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import module_device, unpack_batch
from .attacks import ThreatModel, pgd_attack, projected_gradient_ascent, resolve_threat
from .evaluation import LinearProbeClassifier
from .probe import extract_features

__all__ = [
    "FinetuneSchedule",
    "ALF_CPU",
    "ALF_PAPER",
    "AFF_CPU",
    "AFF_PAPER",
    "fit_adversarial_linear_probe",
    "adversarial_finetune",
]


@dataclass(frozen=True)
class FinetuneSchedule:
    """How long and how hard a fine-tuning mode trains.

    Args:
        epochs: Passes over the training loader.
        lr: SGD learning rate (momentum 0.9).
        milestones: Epochs after which the learning rate is multiplied by 0.1.
        weight_decay: SGD weight decay.
        steps: PGD steps of the inner maximisation.
        step_size: PGD step, in the units of eps (``None``: ``2.5 * eps / steps``, 2/255 for PGD-10 at 8/255).
        batch_size: The batch size the schedule was set for (the caller's loader decides; the CLI uses it).

    Raises:
        ValueError: For a non-positive ``epochs``, ``lr`` or ``steps``, a negative
            ``weight_decay`` or milestones outside ``[1, epochs]``.

    Examples:
        >>> short = FinetuneSchedule(epochs=4, lr=0.05, milestones=(3,), steps=3)
        >>> short.epochs, short.steps
        (4, 3)
    """

    epochs: int
    lr: float
    milestones: tuple[int, ...] = ()
    weight_decay: float = 2e-4
    steps: int = 10
    step_size: float | None = None
    batch_size: int = 128

    def __post_init__(self) -> None:
        for name in ("epochs", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if any(not 1 <= m <= self.epochs for m in self.milestones):
            raise ValueError(f"milestones must lie in [1, epochs={self.epochs}], got {self.milestones!r}")
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"step_size must be > 0 or None, got {self.step_size!r}")

    def optimizer(self, params: Iterable[Tensor]) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """SGD (momentum 0.9) and its step-decay scheduler (stepped once per epoch)."""
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, list(self.milestones), gamma=0.1)


# The DynACL authors' test_LF.py (ALF) and test_AFF.py (AFF) settings.
ALF_PAPER = FinetuneSchedule(epochs=25, lr=0.01, milestones=(10, 20), steps=10, batch_size=512)
AFF_PAPER = FinetuneSchedule(epochs=25, lr=0.1, milestones=(15, 20), steps=10)
# Short schedules for a small encoder on 2 CPU cores, chosen side by side on the CIFAR-10 subset
# (benchmarks/results/protocols-cifar10-subset: ALF ~45 s, AFF ~75 s there; lr 0.01 underfit both).
ALF_CPU = FinetuneSchedule(epochs=10, lr=0.1, milestones=(6, 8), steps=5)
AFF_CPU = FinetuneSchedule(epochs=10, lr=0.1, milestones=(6, 8), steps=5)


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")


def _batches(loader: Iterable, device: torch.device, augment: Callable[[Tensor], Tensor] | None):
    """``(x, y)`` on ``device``, augmented (model-space inputs in, the same space out)."""
    for batch in loader:
        x, y = unpack_batch(batch)
        x, y = x.to(device), y.to(device).long()
        yield (augment(x) if augment is not None else x), y


def fit_adversarial_linear_probe(
    encoder: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    epsilon: float | None = None,
    threat: ThreatModel | None = None,
    norm: str | None = None,
    schedule: FinetuneSchedule = ALF_CPU,
    augment: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
    **deprecated: object,
) -> nn.Linear:
    """ALF: a linear head trained on adversarial inputs through the frozen encoder.

    Each batch is attacked with PGD on the cross-entropy of the current head on
    the frozen encoder (eval mode, BatchNorm included), and the head takes one
    SGD step on the adversarial inputs' features. The head starts at zero, as in
    the papers. The encoder's weights, modes and statistics are left as they were.

    Args:
        encoder: The frozen backbone; its output is flattened per sample.
        loader: Yields ``(x, y, ...)`` training batches (model space: normalised as ``threat`` says).
        num_classes: Number of classes.
        epsilon: Radius of the training attack, a fraction of the pixel range (the shorthand for
            ``threat=ThreatModel(epsilon, norm=norm)``).
        threat: The whole ball instead (radius, norm, the inputs' ``mean``/``std`` and ``bounds``).
        norm: With ``epsilon``: ``"linf"`` (default) or ``"l2"``.
        schedule: Epochs, SGD settings and PGD steps (default ``ALF_CPU``; the papers': ``ALF_PAPER``).
        augment: Applied to each training batch before the attack (e.g. random crops and flips).
        device: Where to train (default: the encoder's device).

    Returns:
        An ``nn.Linear(d, num_classes)`` in eval mode.

    Raises:
        ValueError: For a bad ``num_classes``, ``epsilon`` or ``norm``, or labels outside ``[0, num_classes)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        >>> x = torch.rand(64, 1, 4, 4); y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
        >>> fast = FinetuneSchedule(epochs=2, lr=0.1, steps=3)
        >>> fit_adversarial_linear_probe(encoder, [(x, y)], 2, epsilon=0.05, schedule=fast)
        Linear(in_features=8, out_features=2, bias=True)
    """
    _check_classes(num_classes)
    threat = resolve_threat(threat, epsilon, norm, deprecated, where="fit_adversarial_linear_probe")
    device = torch.device(device) if device is not None else module_device(encoder)
    first = next(iter(loader))
    threat.check_inputs(unpack_batch(first)[0], "loader inputs")  # the ball against the data, before any work
    dim = extract_features(encoder, [first], device=device)[0].shape[1]
    head = nn.Linear(dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt, scheduler = schedule.optimizer(head.parameters())
    model = LinearProbeClassifier(encoder, head)
    with preserved_state(encoder, eval_mode=True), torch.enable_grad():
        frozen = [p.requires_grad for p in encoder.parameters()]
        encoder.requires_grad_(False)  # input gradients only: no encoder .grad is ever written
        try:
            for _ in range(schedule.epochs):
                for x, y in _batches(loader, device, augment):
                    _check_labels(y, num_classes)
                    x_adv = pgd_attack(model, x, y, threat, steps=schedule.steps, step_size=schedule.step_size)
                    with torch.no_grad():
                        features = encoder(x_adv).flatten(1)
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(head(features), y).backward()
                    opt.step()
                scheduler.step()
        finally:
            for p, flag in zip(encoder.parameters(), frozen):
                p.requires_grad_(flag)
    head.zero_grad(set_to_none=True)
    return head.eval()


def _check_labels(y: Tensor, num_classes: int) -> None:
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min().item()}, {y.max().item()}]")


def _trades_attack(model: nn.Module, x: Tensor, clean_probs: Tensor, threat: ThreatModel, schedule) -> Tensor:
    """TRADES' inner maximisation: the KL divergence of the prediction from the clean one, from a tiny random start."""

    def objective(inputs: Tensor) -> Tensor:
        log_probs = F.log_softmax(model(inputs), dim=1)
        return F.kl_div(log_probs, clean_probs, reduction="none").sum(dim=1)

    start = 0.001 * torch.randn(x.shape, dtype=x.dtype, device=x.device)
    steps, step_size = schedule.steps, schedule.step_size
    return projected_gradient_ascent(objective, x, threat, steps=steps, step_size=step_size, start=start)


def adversarial_finetune(
    encoder: nn.Module,
    loader: Iterable,
    num_classes: int,
    *,
    epsilon: float | None = None,
    threat: ThreatModel | None = None,
    norm: str | None = None,
    beta: float = 6.0,
    schedule: FinetuneSchedule = AFF_CPU,
    augment: Callable[[Tensor], Tensor] | None = None,
    device: str | torch.device | None = None,
    head: nn.Linear | None = None,
    **deprecated: object,
) -> LinearProbeClassifier:
    """AFF: TRADES on a copy of the encoder and a new linear head, from the pretrained weights.

    Per batch: the KL-divergence attack of TRADES (model in eval mode, from a
    ``0.001``-scaled Gaussian start), then one SGD step on
    ``CE(f(x), y) + beta * KL(f(x_adv) || f(x))`` with the model in train mode.
    The caller's encoder is deep-copied first and never changed.

    Args:
        encoder: The pretrained backbone (copied).
        loader: Yields ``(x, y, ...)`` training batches (model space).
        num_classes: Number of classes.
        epsilon: Radius of the training attack, a fraction of the pixel range (the shorthand for
            ``threat=ThreatModel(epsilon, norm=norm)``).
        threat: The whole ball instead (radius, norm, the inputs' ``mean``/``std`` and ``bounds``).
        norm: With ``epsilon``: ``"linf"`` (default) or ``"l2"``.
        beta: TRADES' weight of the robustness term (6 in the papers).
        schedule: Epochs, SGD settings and PGD steps (default ``AFF_CPU``; the papers': ``AFF_PAPER``).
        augment: Applied to each training batch (e.g. random crops and flips).
        device: Where to train (default: the encoder's device).
        head: Start from (a copy of) this head instead of zeros, e.g. a linear probe: linear probing then
            full fine-tuning (LP-FT, as DynACL++'s LP-AFT).

    Returns:
        A ``LinearProbeClassifier`` (the fine-tuned copy and its head) in eval mode.

    Raises:
        ValueError: For a bad ``num_classes``, ``epsilon``, ``norm`` or ``beta``, or labels out of range.
        FloatingPointError: If the loss diverges (too large a learning rate for the head's scale).

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU())
        >>> x = torch.rand(64, 1, 4, 4); y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
        >>> fast = FinetuneSchedule(epochs=2, lr=0.1, steps=3)
        >>> model = adversarial_finetune(encoder, [(x, y)], 2, epsilon=0.05, schedule=fast)
        >>> model(x).shape, model.encoder is encoder
        (torch.Size([64, 2]), False)
    """
    _check_classes(num_classes)
    if not (isinstance(beta, (int, float)) and beta >= 0):
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    threat = resolve_threat(threat, epsilon, norm, deprecated, where="adversarial_finetune")
    device = torch.device(device) if device is not None else module_device(encoder)
    first = next(iter(loader))
    threat.check_inputs(unpack_batch(first)[0], "loader inputs")  # the ball against the data, before any work
    dim = extract_features(encoder, [first], device=device)[0].shape[1]
    if head is None:
        head = nn.Linear(dim, num_classes)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    elif not isinstance(head, nn.Linear) or (head.in_features, head.out_features) != (dim, num_classes):
        raise ValueError(f"head must be an nn.Linear({dim}, {num_classes}) for these features, got {head!r}")
    else:
        head = copy.deepcopy(head)
    model = LinearProbeClassifier(copy.deepcopy(encoder), head).to(device)
    model.requires_grad_(True)
    opt, scheduler = schedule.optimizer(model.parameters())
    with torch.enable_grad():
        for epoch in range(schedule.epochs):
            for x, y in _batches(loader, device, augment):
                _check_labels(y, num_classes)
                model.eval()
                with torch.no_grad():
                    clean_probs = F.softmax(model(x), dim=1)
                x_adv = _trades_attack(model, x, clean_probs, threat, schedule)
                model.train()
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
                loss = F.cross_entropy(logits, y) + beta * robust
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"AFF's TRADES loss became {loss.item()} in epoch {epoch}: lower schedule.lr "
                        f"(now {schedule.lr}) or start from a head with smaller weights"
                    )
                loss.backward()
                opt.step()
            scheduler.step()
    model.zero_grad(set_to_none=True)
    return model.eval()
