"""BYOL + robust-reg in a plain PyTorch loop: the online prediction is regularised, the momentum branch stays clean."""

from __future__ import annotations

import copy

import torch
from common import EPSILON, augment, backbone, batches
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from robust_reg import RobustnessRegularizer, method_settings


def train(steps: int = 20) -> float:
    encoder = nn.Sequential(backbone(), BYOLProjectionHead(32, 64, 32))
    online = nn.Sequential(encoder, BYOLPredictionHead(32, 64, 32))  # what the loss compares
    momentum = copy.deepcopy(encoder)
    deactivate_requires_grad(momentum)
    criterion = NegativeCosineSimilarity()
    optimizer = torch.optim.Adam(online.parameters(), lr=1e-3)
    reg = RobustnessRegularizer(epsilon=EPSILON)
    weight = method_settings("byol").weight  # 0.05: the adversarial view carries BYOL's robustness

    for x in batches(steps):
        x0, x1 = augment(x), augment(x)
        p0, p1 = online(x0), online(x1)
        out = reg(online, x1, features=p1, positive=p0)
        with torch.no_grad():
            t0, t1 = momentum(x0), momentum(x1)  # targets from the clean views
        loss = 0.5 * (criterion(p0, t1) + criterion(out.adversarial_features, t0)) + weight * out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_momentum(encoder, momentum, m=0.99)
    return loss.item()


if __name__ == "__main__":
    print(f"BYOL + robust-reg: last loss {train():.3f}")
