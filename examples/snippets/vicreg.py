"""VICReg + robust-reg in a plain PyTorch loop: the expander output, which VICReg's loss compares, is regularised.

VICReg's loss does not normalise its embeddings; the regulariser still measures the deviation
L2-normalised (relative to the batch spread), so shrinking the expander output cannot cheat it.
"""

from __future__ import annotations

import torch
from common import EPSILON, augment, backbone, batches
from lightly.loss import VICRegLoss
from lightly.models.modules import BarlowTwinsProjectionHead
from torch import nn

from robust_reg import RobustnessRegularizer, method_settings


def train(steps: int = 20) -> float:
    model = nn.Sequential(backbone(), BarlowTwinsProjectionHead(32, 64, 64))  # backbone + expander
    criterion = VICRegLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    reg = RobustnessRegularizer(epsilon=EPSILON)
    weight = method_settings("vicreg").weight  # 1.0, not measured for VICReg

    for x in batches(steps):
        x0, x1 = augment(x), augment(x)
        z0, z1 = model(x0), model(x1)
        out = reg(model, x1, features=z1, positive=z0)
        loss = criterion(z0, out.adversarial_features) + weight * out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss.item()


if __name__ == "__main__":
    print(f"VICReg + robust-reg: last loss {train():.3f}")
