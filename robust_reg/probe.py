"""Linear probes on frozen features: the standard downstream head."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._state import preserved_state
from ._utils import flat, module_device, progress, unpack_batch

__all__ = ["fit_linear_probe", "extract_features"]


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    loader: Iterable,
    *,
    device: str | torch.device | None = None,
    progress_bar: bool = False,
) -> tuple[Tensor, Tensor]:
    """Flattened features and labels of a whole loader, with the encoder in eval mode.

    The encoder's modes and statistics are left as they were.

    Returns:
        ``(features (N, d), labels (N,))`` on ``device``.

    Examples:
        >>> import torch
        >>> data = [(torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 0, 1]))] * 2
        >>> feats, labels = extract_features(torch.nn.Flatten(), data)
        >>> feats.shape, labels.shape
        (torch.Size([8, 4]), torch.Size([8]))
    """
    device = torch.device(device) if device is not None else module_device(encoder)
    feats, labels = [], []
    with preserved_state(encoder, eval_mode=True):
        for batch in progress(loader, enabled=progress_bar, desc="features"):
            x, y = unpack_batch(batch)
            feats.append(flat(encoder(x.to(device))).float())
            labels.append(y.to(device))
    if not feats:
        raise ValueError("loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def fit_linear_probe(
    encoder: nn.Module | Callable[[Tensor], Tensor],
    loader: Iterable,
    num_classes: int,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 300,
    device: str | torch.device | None = None,
    progress_bar: bool = False,
) -> nn.Linear:
    """Fit a linear classifier on the frozen encoder's clean features.

    Multinomial logistic regression, full batch, with L-BFGS (deterministic,
    no learning rate to tune) and an L2 penalty ``weight_decay * ||W||_F^2 / 2``
    on the weight.

    Args:
        encoder: The frozen backbone; its output is flattened per sample.
        loader: Yields ``(x, y, ...)`` batches of training data.
        num_classes: Number of classes ``K``.
        weight_decay: L2 penalty on the weight.
        max_iter: L-BFGS iterations.
        device: Where to run (default: the encoder's device).
        progress_bar: Show a progress bar while extracting features.

    Returns:
        An ``nn.Linear(d, K)`` in eval mode on ``device``.

    Raises:
        ValueError: If ``num_classes`` < 2, labels fall outside ``[0, num_classes)``,
            ``weight_decay`` < 0 or ``max_iter`` < 1.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> encoder = nn.Flatten()
        >>> x = torch.rand(64, 1, 4, 4); y = (x.mean(dim=(1, 2, 3)) > 0.5).long()
        >>> head = fit_linear_probe(encoder, [(x, y)], num_classes=2)
        >>> head
        Linear(in_features=16, out_features=2, bias=True)
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if not isinstance(encoder, nn.Module):
        encoder = _CallableModule(encoder)
    feats, labels = extract_features(encoder, loader, device=device, progress_bar=progress_bar)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min().item()}, {labels.max().item()}]")
    head = nn.Linear(feats.shape[1], num_classes).to(feats.device)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(head(feats), labels) + 0.5 * weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    head.zero_grad(set_to_none=True)
    return head.eval()


class _CallableModule(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
