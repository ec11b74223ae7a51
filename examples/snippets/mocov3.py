"""MoCo v3 + robust-reg in a plain PyTorch loop: the query's prediction is regularised, the keys stay clean.

MoCo v3 (Chen, Xie and He, 2021): a query encoder with a prediction head, a momentum key encoder,
and InfoNCE between each view's query and the other view's key (lightly's ``NTXentLoss``).
"""

from __future__ import annotations

import copy

import torch
from common import EPSILON, augment, backbone, batches
from lightly.loss import NTXentLoss
from lightly.models.modules import MoCoProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from torch import nn

from robust_reg import RobustnessRegularizer, method_settings


def train(steps: int = 20) -> float:
    encoder = nn.Sequential(backbone(), MoCoProjectionHead(32, 64, 32, num_layers=3, batch_norm=True))
    query = nn.Sequential(encoder, MoCoProjectionHead(32, 64, 32, batch_norm=True))  # what InfoNCE compares
    key = copy.deepcopy(encoder)
    deactivate_requires_grad(key)
    criterion = NTXentLoss(temperature=0.2)
    optimizer = torch.optim.AdamW(query.parameters(), lr=1e-3)
    reg = RobustnessRegularizer(epsilon=EPSILON)
    weight = method_settings("mocov3").weight  # 1.0, not measured for MoCo v3

    for x in batches(steps):
        x0, x1 = augment(x), augment(x)
        q0, q1 = query(x0), query(x1)
        out = reg(query, x1, features=q1, positive=q0)
        with torch.no_grad():
            k0, k1 = key(x0), key(x1)  # keys from the clean views
        loss = criterion(q0, k1) + criterion(out.adversarial_features, k0) + weight * out.loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_momentum(encoder, key, m=0.99)
    return loss.item()


if __name__ == "__main__":
    print(f"MoCo v3 + robust-reg: last loss {train():.3f}")
