"""Build real solo-learn methods on CPU from the example configs in examples/solo_learn/."""

from __future__ import annotations

from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "solo_learn"
CIFAR_MEAN = torch.tensor((0.4914, 0.4822, 0.4465)).view(3, 1, 1)
CIFAR_STD = torch.tensor((0.2470, 0.2435, 0.2616)).view(3, 1, 1)


def solo_available() -> tuple[bool, str]:
    try:
        import solo.methods  # noqa: F401
        from solo.args.pretrain import parse_cfg  # noqa: F401
    except Exception as err:  # PyPI's solo-learn 1.0.2 fails with errors other than ImportError
        reason = f"solo-learn >= 1.0.6 is not importable ({type(err).__name__}: {err}); install it from its repository"
        return False, reason
    return True, ""


def small_cfg(method: str, **overrides):
    """The example config, shrunk to a CPU-sized model (resnet18 backbone, small heads)."""
    from omegaconf import OmegaConf
    from solo.args.pretrain import parse_cfg

    cfg = OmegaConf.load(EXAMPLES / f"{method}_cifar10_robust.yaml")
    OmegaConf.set_struct(cfg, False)
    for key in ("proj_hidden_dim", "pred_hidden_dim"):
        if key in cfg.method_kwargs:
            cfg.method_kwargs[key] = 64
    cfg.method_kwargs.proj_output_dim = 32
    cfg.optimizer.batch_size = 8
    cfg.devices, cfg.num_nodes = [0], 1  # parse_cfg scales the lr by len(devices)
    cfg.accelerator, cfg.strategy, cfg.precision, cfg.sync_batchnorm = "cpu", "auto", 32, False
    cfg.checkpoint.enabled = False
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return parse_cfg(cfg)


class CropPairs(torch.utils.data.Dataset):
    """Real 8x8 digits upsampled to 32x32 RGB, two crops each, normalised like solo-learn's CIFAR-10."""

    def __init__(self, n: int = 32) -> None:
        from sklearn.datasets import load_digits

        images = torch.tensor(load_digits().images[:n], dtype=torch.float32) / 16.0
        images = torch.nn.functional.interpolate(images[:, None], size=32, mode="bilinear", align_corners=False)
        self.images = images.expand(-1, 3, -1, -1).clamp(0, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        views = [img, img.flip(-1)]
        return i, [(v - CIFAR_MEAN) / CIFAR_STD for v in views], i % 10


def loader(n: int = 32, batch_size: int = 8) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(CropPairs(n), batch_size=batch_size, shuffle=False, drop_last=True)
