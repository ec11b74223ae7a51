"""SimCLR + robust-reg in a plain PyTorch loop (lightly's NT-Xent and projection head)."""

from __future__ import annotations

import torch
from common import EPSILON, augment, backbone, batches
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from torch import nn

from robust_reg import RobustnessRegularizer, method_settings


def train(steps: int = 20) -> float:
    model = nn.Sequential(backbone(), SimCLRProjectionHead(32, 64, 32))  # what NT-Xent compares
    criterion = NTXentLoss(temperature=0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    reg = RobustnessRegularizer(epsilon=EPSILON)  # the recommended form
    weight = method_settings("simclr").weight  # 1.0

    for x in batches(steps):
        x0, x1 = augment(x), augment(x)
        z0, z1 = model(x0), model(x1)
        out = reg(model, x1, features=z1, positive=z0)  # x1 perturbed away from z0
        loss = criterion(z0, out.adversarial_features) + weight * out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


if __name__ == "__main__":
    print(f"SimCLR + robust-reg: last loss {train():.3f}")
