"""Robust downstream evaluation of a saved encoder (the same as ``robust-reg evaluate``).

    python examples/evaluate.py runs/simclr_reg.pt                     # dataset from the checkpoint
    python examples/evaluate.py runs/cifar10_simclr_reg.pt --epsilons 0.0157 0.0314

Freezes the encoder, fits a linear probe on clean training features, and attacks
the probe on the test set: PGD-20, AutoAttack (if torchattacks is installed),
Square, the gradient-masking sanity checks, the BoundReport and a robustness
curve; writes JSON and PNG files to ``--out``. The checkpoint is loaded with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import sys

from robust_reg.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["evaluate", *sys.argv[1:]]))
