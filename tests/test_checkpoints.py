"""Every checkpoint kind robust-reg reads comes back as the same network, taking [0, 1] pixels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")

import torchvision  # noqa: E402

from robust_reg.demo.checkpoints import CheckpointError, PixelInput, load_checkpoint, save_checkpoint  # noqa: E402
from robust_reg.demo.models import build_encoder  # noqa: E402


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x).flatten(1), b.eval()(x).flatten(1))


def test_a_robust_reg_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder("cnn", 3)
    path = save_checkpoint(tmp_path / "cnn.pt", encoder, arch="cnn", dataset="cifar10-subset")
    loaded, meta = load_checkpoint(path)
    same_outputs(encoder, loaded, torch.rand(4, 3, 16, 16))
    assert meta["source"] == "robust-reg" and meta["dataset"] == "cifar10-subset"


def test_a_normalised_encoder_round_trips_with_its_normalisation(tmp_path):
    torch.manual_seed(0)
    encoder = PixelInput(build_encoder("cnn", 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    path = save_checkpoint(tmp_path / "n.pt", encoder, arch="cnn", dataset="npz")
    loaded, meta = load_checkpoint(path)
    assert isinstance(loaded, PixelInput) and meta["normalize"][1] == pytest.approx([0.2, 0.25, 0.3])
    same_outputs(encoder, loaded, torch.rand(4, 3, 16, 16))


def test_a_torchvision_resnet18_state_dict_loads_as_that_network_without_its_classifier(tmp_path):
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18()
    torch.save(resnet.state_dict(), tmp_path / "resnet18.pth")
    loaded, meta = load_checkpoint(tmp_path / "resnet18.pth")
    resnet.fc = nn.Identity()
    same_outputs(resnet, loaded, torch.rand(2, 3, 64, 64))
    assert (meta["source"], meta["arch"], meta["in_channels"]) == ("state_dict", "resnet18-imagenet", 3)


def lightning_checkpoint(backbone: nn.Module, path, extra: dict | None = None):
    """A checkpoint Lightning itself writes, of a user's module keeping its encoder as ``backbone``."""
    pl = pytest.importorskip("pytorch_lightning")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.backbone = backbone
            self.head = nn.Linear(512, 8)

        def training_step(self, batch, _):
            return self.head(self.backbone(batch[0]).flatten(1)).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)  # the weights stay as built

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(4, 3, 32, 32)), batch_size=4)
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(Module(), data)
    trainer.save_checkpoint(path)
    return path


def test_a_lightning_checkpoint_of_a_module_with_a_resnet_backbone_loads_its_backbone(tmp_path):
    torch.manual_seed(0)
    backbone = build_encoder("resnet18", 3)  # lightly's examples: nn.Sequential(*resnet.children()[:-1])
    path = lightning_checkpoint(backbone, tmp_path / "lightly.ckpt")
    loaded, meta = load_checkpoint(path)
    same_outputs(backbone, loaded, torch.rand(2, 3, 32, 32))
    assert (meta["source"], meta["arch"]) == ("lightning", "resnet18")


def test_a_lightning_checkpoint_without_a_backbone_is_a_one_line_error_naming_what_is_supported(tmp_path):
    pl = pytest.importorskip("pytorch_lightning")
    record = {"state_dict": {"encoder.0.weight": torch.zeros(1)}, "pytorch-lightning_version": pl.__version__}
    torch.save(record, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match=r"without a `backbone` module \(it has encoder\).*torchvision") as err:
        load_checkpoint(tmp_path / "other.ckpt")
    assert "\n" not in str(err.value)


def test_an_unknown_state_dict_asks_for_the_architecture(tmp_path):
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"bare state_dict.*--arch \(cnn, cnn-wide, resnet18"):
        load_checkpoint(tmp_path / "odd.pt")


def test_a_checkpoint_of_another_shape_is_refused_naming_the_kinds(tmp_path):
    torch.save({"model": "resnet", "epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="none of what robust-reg reads: a robust-reg checkpoint"):
        load_checkpoint(tmp_path / "meta.pt")
