"""SimCLR and BYOL from lightly's building blocks, and the pretraining loop of the demo and the examples.

The loop is a plain PyTorch loop, written the way a lightly user writes one, and its robust
step is the package's public API and nothing else: ``RobustnessRegularizer(epsilon)`` (the
recommended form, N-FGSM's one noisy step) on the embedding the SSL loss compares, whose adversarial
embedding replaces view 0's in the loss, with the method's weight from ``robust_reg.method_settings``,
and the augmentation annealed from strong to weak by ``robust_reg.augmentation.augmentation_strength``
(DynACL's schedule). So the demo measures what users get. The screening harness (every variant that was measured, ACL
baselines) lives in ``benchmarks/harness.py`` and reuses this loop with its own step.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import CollapseMonitor, RobustnessRegularizer, method_settings
from ..augmentation import augmentation_strength
from .augment import BatchAugment, default_augment
from .data import ImageData, batches
from .models import build_encoder, feature_dim

METHODS = ("simclr", "byol")

# Per-dataset training defaults of the demo, the examples and the benchmarks.
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "mnist5k": dict(arch="cnn", epochs=30, batch_size=64, lr=1e-3, epsilon=0.1),
    "digits": dict(arch="cnn", epochs=30, batch_size=64, lr=1e-3, epsilon=0.1),
    "fake": dict(arch="cnn", epochs=2, batch_size=64, lr=1e-3, epsilon=0.1),
    "cifar10": dict(arch="resnet18", epochs=200, batch_size=512, lr=2e-3, epsilon=8 / 255),
    # The offline subset on 2 CPU cores: the small CNN (a ResNet-18 fits only a pilot there).
    "cifar10-subset": dict(arch="cnn", epochs=30, batch_size=64, lr=1e-3, epsilon=8 / 255),
}
# An .npz of the user's: by the kind of its images.
KIND_DEFAULTS = {"digits": DATASET_DEFAULTS["mnist5k"], "natural": DATASET_DEFAULTS["cifar10-subset"]}


def training_defaults(data: ImageData) -> dict:
    """The training defaults of a loaded dataset: its name's, else its kind's (an ``npz`` file)."""
    return DATASET_DEFAULTS.get(data.name) or KIND_DEFAULTS[data.kind]


class _SSLModel(nn.Module):
    """``forward`` is the embedding the loss compares: ``embed(backbone(x))``."""

    backbone: nn.Module

    def embed(self, h: Tensor) -> Tensor:
        """The embedding the loss compares, from backbone features (each method's own)."""
        raise NotImplementedError

    def loss_from_embeddings(self, views: tuple[Tensor, Tensor], embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """The SSL loss of two views' embeddings (each method's own)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.backbone(x))

    def loss_from_features(self, views: tuple[Tensor, Tensor], features: tuple[Tensor, Tensor]) -> Tensor:
        return self.loss_from_embeddings(views, (self.embed(features[0]), self.embed(features[1])))


def _alternatives(z: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return z if isinstance(z, tuple) else (z,)


class SimCLR(_SSLModel):
    """SimCLR (Chen et al. 2020): NT-Xent on projections of two views."""

    def __init__(self, backbone: nn.Module, dim: int, *, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(dim, hidden_dim, out_dim)
        self.criterion = NTXentLoss(temperature=0.5)

    def embed(self, h: Tensor) -> Tensor:
        """The embedding the loss compares, from backbone features."""
        return self.projection_head(h.flatten(start_dim=1))

    def loss_from_embeddings(self, views: tuple[Tensor, Tensor], embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """``embeddings[0]`` may be a tuple of view-0 embeddings (clean and adversarial): their losses are averaged."""
        z0s, z1 = _alternatives(embeddings[0]), embeddings[1]
        return sum(self.criterion(z0, z1) for z0 in z0s) / len(z0s)

    def after_step(self, progress: float) -> None:
        pass


class BYOL(_SSLModel):
    """BYOL (Grill et al. 2020): predict a momentum encoder's projection of the other view."""

    def __init__(self, backbone: nn.Module, dim: int, *, hidden_dim: int = 512, out_dim: int = 128) -> None:
        super().__init__()
        from lightly.loss import NegativeCosineSimilarity
        from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.backbone = backbone
        self.projection_head = BYOLProjectionHead(dim, hidden_dim, out_dim)
        self.prediction_head = BYOLPredictionHead(out_dim, hidden_dim, out_dim)
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()
        self.momentum = 0.99

    def embed(self, h: Tensor) -> Tensor:
        """The embedding the loss compares (the prediction), from backbone features."""
        return self.prediction_head(self.projection_head(h.flatten(start_dim=1)))

    def _target(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1))

    def loss_from_embeddings(self, views: tuple[Tensor, Tensor], embeddings: tuple[Tensor, Tensor]) -> Tensor:
        """``views`` feed the momentum branch (the targets), ``embeddings`` are the online predictions;
        ``embeddings[0]`` may be a tuple of view-0 predictions (clean and adversarial): their losses are averaged."""
        p0s, p1 = _alternatives(embeddings[0]), embeddings[1]
        t0, t1 = (self._target(x) for x in views)
        return 0.5 * (sum(self.criterion(p0, t1) for p0 in p0s) / len(p0s) + self.criterion(p1, t0))

    def after_step(self, progress: float) -> None:
        from lightly.models.utils import update_momentum

        # Cosine schedule of the momentum from 0.99 to 1, as in BYOL.
        m = 1 - (1 - self.momentum) * (math.cos(math.pi * progress) + 1) / 2
        update_momentum(self.backbone, self.backbone_momentum, m=m)
        update_momentum(self.projection_head, self.projection_head_momentum, m=m)


def check_method(method: str) -> None:
    """Raise naming ``method`` unless the loop builds it."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one pretraining run of the demo or the examples.

    Attributes:
        method: ``simclr`` or ``byol``.
        robust: Add the package's default regulariser (``False``: plain SSL).
        arch: Encoder architecture (``cnn`` or ``resnet18``).
        epochs: Passes over the training images.
        batch_size: Images per step (two views each).
        lr: AdamW learning rate (cosine schedule).
        weight_decay: AdamW weight decay.
        weight: Weight of the regulariser (``None``: the method's, ``robust_reg.method_settings``).
        epsilon: Radius of the threat ball (pixel units).
        norm: ``linf`` or ``l2``.
        steps: ``None``: the regulariser's default inner maximisation (N-FGSM's one step for an L-inf ball up
            to 1/6); a number: that many PGD steps (0.2's default: 3).
        anneal_augmentation: With ``robust``, anneal the augmentation from strong to weak over the epochs
            (``robust_reg.augmentation.augmentation_strength``, DynACL's schedule): the recommended recipe.
            ``False``: the augmentation as built at every epoch. Plain SSL never anneals.
        seed: Seed of initialisation, shuffling and augmentation.
        amp: bfloat16 autocast (on CUDA).
        channels_last: Keep the model's weights and each batch in ``torch.channels_last``
            memory format (faster convolutions on recent GPUs; the results equal the default's
            to float tolerance).
    """

    method: str = "simclr"
    robust: bool = True
    arch: str = "cnn"
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    weight: float | None = None
    epsilon: float = 0.1
    norm: str = "linf"
    steps: int | None = None
    anneal_augmentation: bool = True
    seed: int = 0
    amp: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        check_method(self.method)
        weight = self.weight
        if weight is None:
            settings = method_settings(self.method)
            weight = 1.0 if settings is None else settings.weight
            object.__setattr__(self, "weight", weight)
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight}")


@dataclass
class PretrainResult:
    """The trained encoder and what happened while training it."""

    encoder: nn.Module
    model: nn.Module
    config: Any
    dataset: str
    seconds: float
    steps: int
    history: list[dict] = field(default_factory=list)
    monitor_seconds: float = 0.0  # the collapse monitor's checks, not counted in ``seconds``

    def summary(self) -> dict:
        return {
            "config": asdict(self.config),
            "seconds": self.seconds,
            "steps": self.steps,
            "history": self.history,
            "monitor_seconds": self.monitor_seconds,
        }

    def save(self, path: str | Path) -> Path:
        """Save the encoder with its architecture, dataset and config (see ``checkpoints.load_checkpoint``)."""
        from .checkpoints import save_checkpoint

        return save_checkpoint(
            path, self.encoder, arch=self.config.arch, dataset=self.dataset, config=self.summary()["config"]
        )


def build_model(method: str, backbone: nn.Module, image_shape: tuple[int, int, int]) -> nn.Module:
    dim = feature_dim(backbone, image_shape)
    return (SimCLR if method == "simclr" else BYOL)(backbone, dim)


#: ``step(model, x, index, epoch, augment) -> (loss, regulariser value)``: one training step's loss.
Step = Callable[[nn.Module, Tensor, Tensor, int, BatchAugment], tuple[Tensor, float]]


def _regularizer(config: TrainConfig) -> RobustnessRegularizer:
    return RobustnessRegularizer(config.epsilon, norm=config.norm, steps=config.steps)


def collapse_monitor(config: TrainConfig, data: ImageData, *, images: int = 128) -> CollapseMonitor | None:
    """The run's ``CollapseMonitor`` (``None`` for plain SSL): the regulariser the step trains with, the first
    ``images`` training images without augmentation (fixed across epochs)."""
    if not config.robust:
        return None
    return CollapseMonitor(_regularizer(config), data.x_train[:images])


def recommended_step(config: TrainConfig) -> Step:
    """Plain SSL, or SSL + the package default through the public API (what the README's quick start does):
    the regulariser's default, and the augmentation annealed by ``augmentation_strength`` of each epoch."""
    reg = _regularizer(config)
    annealed: dict[float, BatchAugment] = {}

    def step(model: Any, x: Tensor, index: Tensor, epoch: int, augment: BatchAugment) -> tuple[Tensor, float]:
        if config.robust and config.anneal_augmentation:
            strength = augmentation_strength(epoch, config.epochs)
            if strength not in annealed:
                annealed[strength] = augment.with_strength(strength)
            augment = annealed[strength]
        x0, x1 = augment(x), augment(x)
        z0, z1 = model(x0), model(x1)
        if not config.robust:
            return model.loss_from_embeddings((x0, x1), (z0, z1)), 0.0
        out = reg(model, x0, features=z0, positive=z1.detach())
        # Views feed BYOL's momentum targets: they stay clean.
        loss = model.loss_from_embeddings((x0, x1), (out.adversarial_features, z1)) + config.weight * out.loss
        return loss, out.loss.item()

    return step


def pretrain(
    data: ImageData,
    config: Any,
    *,
    device: str | torch.device = "cpu",
    augment: BatchAugment | None = None,
    progress_bar: bool = True,
    log: Callable[[str], None] | None = None,
    step: Step | None = None,
    prepare: Callable[[nn.Module], None] | None = None,
    monitor: CollapseMonitor | None = None,
    replays: int = 1,
) -> PretrainResult:
    """Pretrain an encoder on ``data.x_train`` (labels unused).

    ``config`` gives ``method``, ``arch``, ``epochs``, ``batch_size``, ``lr``, ``weight_decay``,
    ``seed``, ``amp`` and optionally ``channels_last`` (a ``TrainConfig``, or the benchmarks'
    richer config); ``step`` computes each batch's loss (default: ``recommended_step`` of a ``TrainConfig``);
    ``prepare`` may change the model's layers before the optimizer takes its parameters. ``monitor``
    (``collapse_monitor``) checks the model after each epoch: its findings go to the history and the log, its
    time to ``monitor_seconds`` (not ``seconds``); it leaves the training as it would be without it.
    ``replays``: optimizer steps on each batch in a row, the same ``x`` object passed to ``step`` each time
    (free adversarial training's minibatch replay, Shafahi et al. 2019; the step keeps what it needs between them).
    """
    if isinstance(replays, bool) or not isinstance(replays, int) or replays < 1:
        raise ValueError(f"replays must be a positive int, got {replays!r}")
    torch.manual_seed(config.seed)
    device = torch.device(device)
    backbone = build_encoder(config.arch, data.image_shape[0])
    model = build_model(config.method, backbone, data.image_shape)
    if prepare is not None:
        prepare(model)
    memory_format = torch.channels_last if getattr(config, "channels_last", False) else torch.preserve_format
    model = model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # stubs lack memory_format
    augment = augment or default_augment(data.kind)
    step = step or recommended_step(config)
    total = config.epochs * max(1, data.x_train.shape[0] // config.batch_size) * replays
    optimizer, scheduler = _optimizer(model, config, total)
    generator = torch.Generator().manual_seed(config.seed)
    result = PretrainResult(backbone, model, config, data.name, 0.0, 0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda")
    indices = torch.arange(data.x_train.shape[0])
    start = time.perf_counter()
    model.train()
    for epoch in _epochs(config.epochs, progress_bar, config.method):
        sums = [0.0, 0.0, 0]
        # Labels are unused: the batches carry each image's index (for a warm start's memory).
        for x, index in batches(data.x_train, indices, config.batch_size, shuffle=True, generator=generator):
            x, index = x.to(device, non_blocking=True, memory_format=memory_format), index.to(device)
            for _ in range(replays):
                with autocast:
                    loss, reg_value = step(model, x, index, epoch, augment)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                result.steps += 1
                model.after_step(result.steps / total)
                sums = [sums[0] + loss.item(), sums[1] + reg_value, sums[2] + 1]
        record: dict[str, Any] = {"epoch": epoch, "loss": sums[0] / max(sums[2], 1), "reg": sums[1] / max(sums[2], 1)}
        line = f"epoch {epoch}: loss {record['loss']:.4f} reg {record['reg']:.4f}"
        line += "" if monitor is None else _check_collapse(monitor, model, epoch, result, record)
        result.history.append(record)
        if log is not None:
            log(line)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result.seconds = time.perf_counter() - start - result.monitor_seconds
    model.eval()
    return result


def _optimizer(model: nn.Module, config: Any, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW on the trainable parameters and its cosine learning-rate schedule over ``total`` steps."""
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    cosine = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


def _check_collapse(
    monitor: CollapseMonitor, model: nn.Module, epoch: int, result: PretrainResult, record: dict
) -> str:
    """One epoch's monitor check: into ``record`` and ``result.monitor_seconds``; returns the log line's tail."""
    checked = time.perf_counter()
    report = monitor(model, epoch)
    result.monitor_seconds += time.perf_counter() - checked
    record.update(
        monitor_training_attack=report.training_attack,
        monitor_strong_attack=report.strong_attack,
        collapsed=report.collapsed,
    )
    return f"; {str(report).removeprefix(f'epoch {epoch}: ')}"


def _epochs(epochs: int, bar: bool, desc: str) -> Any:
    """``range(epochs)``, in a tqdm bar when asked and tqdm is installed (optional: a nicety)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        bar = False
    return tqdm(range(epochs), desc=desc, leave=False, dynamic_ncols=True) if bar else range(epochs)
