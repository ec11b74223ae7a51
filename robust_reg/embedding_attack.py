"""A label-free attack on the representation itself, and a cheap task-level reading of it.

``embedding_attack`` runs PGD that maximises how far the encoder's features
move from the clean ones (the deviation ascent of the bound, run as an
evaluation at a fixed budget). It needs no labels and no head: it measures the
encoder for every task at once. Deviations are reported relative to the
spread ``sigma`` of the clean features (the root mean squared distance to their
mean), so encoders of different scales compare; a random perturbation of the
same size is measured beside it as a floor. The deviations are lower
estimates of the worst case (an ascent finds a point of the ball, not its
maximum).

``EmbeddingAttack.knn_changed`` reads the same attack at task level: the
fraction of test samples whose k-NN prediction (k = 20, cosine similarity,
similarity-weighted votes, on training features and labels) changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import flat, module_device
from .attacks import ThreatModel, projected_gradient_ascent, resolve_threat

__all__ = ["EmbeddingAttack", "embedding_attack", "knn_predict"]


@dataclass(frozen=True)
class EmbeddingAttack:
    """What the label-free attack did to the features.

    Attributes:
        epsilon: Radius of the attack, a fraction of the pixel range.
        norm: ``"linf"`` or ``"l2"``.
        steps: PGD steps.
        sigma: Spread of the clean features (root mean squared distance to their mean).
        relative_deviation: Per sample, ``||f(x_adv) - f(x)|| / sigma`` (a lower estimate of the worst case).
        random_deviation: Per sample, the same for a random point of the ball (uniform draw).
        clean_features: ``f(x)``, flattened, CPU.
        adversarial_features: ``f(x_adv)``, flattened, CPU.
    """

    epsilon: float
    norm: str
    steps: int
    sigma: float
    relative_deviation: Tensor = field(repr=False)
    random_deviation: Tensor = field(repr=False)
    clean_features: Tensor = field(repr=False)
    adversarial_features: Tensor = field(repr=False)

    @property
    def mean(self) -> float:
        """Mean relative deviation under the attack."""
        return self.relative_deviation.mean().item()

    @property
    def p95(self) -> float:
        """95th percentile of the relative deviation under the attack."""
        return torch.quantile(self.relative_deviation, 0.95).item()

    @property
    def random_mean(self) -> float:
        """Mean relative deviation under a random perturbation of the same ball (the floor)."""
        return self.random_deviation.mean().item()

    def knn_changed(self, train_features: Tensor, train_labels: Tensor, *, k: int = 20) -> float:
        """The fraction of attacked samples whose k-NN prediction differs from the clean one."""
        clean = knn_predict(train_features, train_labels, self.clean_features, k=k)
        attacked = knn_predict(train_features, train_labels, self.adversarial_features, k=k)
        return (clean != attacked).float().mean().item()

    def to_dict(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "norm": self.norm,
            "steps": self.steps,
            "num_samples": len(self.relative_deviation),
            "sigma": self.sigma,
            "mean_relative_deviation": self.mean,
            "p95_relative_deviation": self.p95,
            "random_mean_relative_deviation": self.random_mean,
        }

    def __str__(self) -> str:
        return (
            f"Embedding attack ({self.norm} eps={self.epsilon:.4g}, PGD-{self.steps}, {len(self.relative_deviation)} "
            f"samples): feature deviation / sigma mean {self.mean:.3f}, 95th percentile {self.p95:.3f} "
            f"(random point of the ball: {self.random_mean:.3f}); estimates of the worst case from below"
        )


def knn_predict(train_features: Tensor, train_labels: Tensor, features: Tensor, *, k: int = 20) -> Tensor:
    """k-NN labels of ``features``: cosine similarity, votes weighted by ``exp(similarity / 0.07)``.

    Examples:
        >>> import torch
        >>> train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]); labels = torch.tensor([0, 0, 1])
        >>> knn_predict(train, labels, torch.tensor([[1.0, 0.05], [0.05, 1.0]]), k=1)
        tensor([0, 1])
    """
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(train_features):
        raise ValueError(f"k must be an int in [1, {len(train_features)}], got {k!r}")
    train = F.normalize(flat(train_features).float(), dim=1)
    labels = train_labels.to(train.device).long()
    classes = int(labels.max().item()) + 1
    out = []
    for chunk in flat(features).float().to(train.device).split(1024):
        sim, idx = (F.normalize(chunk, dim=1) @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), classes, device=train.device)
        votes.scatter_add_(1, labels[idx], (sim / 0.07).exp())
        out.append(votes.argmax(1))
    return torch.cat(out).cpu()


def embedding_attack(
    encoder: nn.Module,
    x: Tensor,
    *,
    epsilon: float | None = None,
    threat: ThreatModel | None = None,
    norm: str | None = None,
    steps: int = 20,
    step_size: float | None = None,
    batch_size: int = 500,
    seed: int = 0,
    **deprecated: object,
) -> EmbeddingAttack:
    """PGD on the squared deviation of the encoder's features from the clean ones; no labels needed.

    Runs in eval mode from a uniform random start, keeping each sample's best
    iterate; the encoder's modes, statistics and the caller's RNG are left as
    they were.

    Args:
        encoder: The backbone; its output is flattened per sample.
        x: Inputs in model space (normalised as ``threat`` says).
        epsilon: Radius of the ball, a fraction of the pixel range (``8 / 255``): the shorthand for
            ``threat=ThreatModel(epsilon, norm=norm)``.
        threat: The whole ball instead (radius, norm, the inputs' ``mean``/``std`` and ``bounds``).
        norm: With ``epsilon``: ``"linf"`` (default) or ``"l2"``.
        steps: PGD steps.
        step_size: Step length (default ``2.5 * epsilon / steps``).
        batch_size: Samples per attack batch.
        seed: Seed of the random starts and of the random-perturbation floor.

    Returns:
        An ``EmbeddingAttack``.

    Raises:
        ValueError: For a bad ``epsilon``, ``norm`` or ``steps``, or inputs outside ``bounds``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> encoder = nn.Sequential(nn.Flatten(), nn.Linear(16, 8))
        >>> result = embedding_attack(encoder, torch.rand(32, 1, 4, 4), epsilon=0.05, steps=5)
        >>> result.mean >= result.random_mean
        True
    """
    threat = resolve_threat(threat, epsilon, norm, deprecated, where="embedding_attack")
    threat.check_inputs(x, "x")
    device = module_device(encoder)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    clean, adv, rand = [], [], []
    with torch.random.fork_rng(devices=cuda), preserved_state(encoder, eval_mode=True):
        torch.manual_seed(seed)
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            with torch.no_grad():
                h = flat(encoder(xb)).detach()

            def deviation(inputs: Tensor, h: Tensor = h) -> Tensor:
                return (flat(encoder(inputs)) - h).pow(2).sum(dim=1)

            x_adv = projected_gradient_ascent(deviation, xb, threat, steps=steps, step_size=step_size, keep_best=True)
            pixels = threat.to_pixels(xb)
            x_rand = threat.to_model(pixels + threat.random_start(pixels))
            with torch.no_grad():
                clean.append(h.float().cpu())
                adv.append(flat(encoder(x_adv)).float().cpu())
                rand.append(flat(encoder(x_rand)).float().cpu())
    clean_f, adv_f, rand_f = torch.cat(clean), torch.cat(adv), torch.cat(rand)
    sigma = (clean_f - clean_f.mean(0)).pow(2).sum(1).mean().sqrt().clamp_min(torch.finfo(torch.float32).tiny)
    return EmbeddingAttack(
        threat.epsilon,
        threat.norm,
        steps,
        sigma.item(),
        (adv_f - clean_f).norm(dim=1) / sigma,
        (rand_f - clean_f).norm(dim=1) / sigma,
        clean_f,
        adv_f,
    )
