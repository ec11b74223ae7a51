"""Two CPU processes, Lightning's ``ddp`` strategy (gloo), a robustified lightly-style module.

Run by ``test_ddp.py`` as ``python ddp_lightly_script.py OUT_DIR [simclr|byol] [adversarial_view]``;
Lightning re-launches this script for rank 1. Each rank saves its parameters
and the logged regulariser values to ``OUT_DIR/rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from robust_reg.integrations.lightly import robustify

from lightly_modules import BYOL, SimCLR, loader


class Record(pl.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.values, self.initial = out, [], {}

    def on_train_start(self, trainer, module):
        self.initial = {name: p.detach().clone() for name, p in module.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(trainer.callback_metrics["robust_reg/value"].item())

    def on_train_end(self, trainer, module):
        params = {name: p.detach().clone() for name, p in module.named_parameters()}
        record = {"params": params, "initial": self.initial, "values": self.values}
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def main() -> None:
    out = Path(sys.argv[1])
    method = sys.argv[2] if len(sys.argv) > 2 else "simclr"
    adversarial_view = len(sys.argv) > 3 and sys.argv[3] == "adversarial_view"
    torch.manual_seed(0)
    module = robustify((SimCLR if method == "simclr" else BYOL)(), adversarial_view=adversarial_view)
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record(out)],
        default_root_dir=str(out),
    )
    trainer.fit(module, loader(n=64, batch_size=8))


if __name__ == "__main__":
    main()
