"""The post-hoc benchmark: robustify a plainly pretrained encoder, against DeACL and FARE, at equal stage budgets.

Per seed, in one process: plain SimCLR trained for the recipe's epochs (its time P) and robust-reg's default
from scratch (its time R: the record budget). The stage budget B = R - P, the time the default spends beyond
plain pretraining; each stage method gets B and 2B (``--budgets``) from the same plain encoder, its epochs
set from an unscored 1-epoch timing run in the same process. The from-scratch default at the larger total
time (P + 2B) is a row too. Every row is scored like the record (``compare.py``'s evaluation) and written
in its report format, so ``compare.py --render`` merges seeds and prints the paired differences.

Stage methods (facts from the authors' code, not their code; ``docs/peers.md`` lists what differs):

- ``harden``: ``robust_reg.harden`` (the frozen original as the anchor, the regulariser's ascent).
- ``deacl``: DeACL's stage 2 (``pantheon5100/DeACL``, ``solo/methods/mocov2_distillation_AT.py``): the student
  starts as the teacher (no ``--student_scratch`` in ``bash_files/DeACL_cifar10_resnet18.sh``); PGD-5 at eps,
  step 2/255, uniform random start, student in eval mode, minimising ``cos(s(x_adv), t(x))``; loss
  ``-cos(s(x), t(x)) - 2 cos(s(x_adv), s(x))`` on weakly augmented images (crops and flips), clean and
  adversarial batches through the student together; SGD momentum 0.9, weight decay 5e-4, lr 0.5 at batch
  256 (scaled linearly to the batch here), cosine schedule.
- ``fare``: FARE (``chs20/RobustVLM``, ``train/adversarial_training_clip.py``): the student starts as the
  original; PGD-10, step 1/255, uniform random start, student in eval mode, maximising
  ``||s(x_adv) - t(x)||^2``; loss ``||s(x_adv) - t(x)||^2`` on the raw embeddings, no clean term; AdamW, weight
  decay 1e-4, cosine schedule; no augmentation. FARE's lr (1e-5, for CLIP) is an option (``--fare-lr``).

Command (per seed N; ``--render`` merges):

    OMP_NUM_THREADS=1 python benchmarks/posthoc.py --dataset cifar10-subset \
        --data-path ../shared/cifar10-subset/cifar10_subset.npz --split test --seeds N --aa-samples 500 \
        --out benchmarks/results/posthoc-cifar10-subset/seedN
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402

from robust_reg import ThreatModel, harden  # noqa: E402
from robust_reg.demo.pipeline import EvalConfig, ShuffledBatches, crop_flip, evaluate_encoder  # noqa: E402
from robust_reg.finetune import FinetuneSchedule  # noqa: E402

STAGES = ("harden", "deacl", "fare")
DEACL_LR_AT_256 = 0.5
DEACL_K = 2.0  # trades_k in DeACL's CIFAR-10 script


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = compare.script_arguments(__doc__.split("\n\n")[0])
    p.add_argument("--methods", default=",".join(STAGES), help=f"stage methods, a subset of {', '.join(STAGES)}")
    p.add_argument("--budgets", default="1,2", help="stage budgets, multiples of B = (default's time - plain's)")
    p.add_argument("--batch-size", type=int, default=128, help="the stages' batch size")
    p.add_argument("--harden-lr", type=float, default=0.02)
    p.add_argument("--fare-lr", type=float, default=1e-5)
    return p.parse_args(argv)


# --- the stages ------------------------------------------------------------------------------------------


def _frozen_features(teacher: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return teacher(x).flatten(1)


def _pgd(objective: Callable[[Tensor], Tensor], x: Tensor, eps: float, step: float, steps: int) -> Tensor:
    """Sign-gradient ascent of a per-batch objective from a uniform start in the L-inf ball, pixels in [0, 1]."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad = torch.autograd.grad(objective(x_adv), x_adv)[0]
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def deacl_stage(teacher: nn.Module, loader, epochs: int, eps: float, batch_size: int, augment) -> nn.Module:
    student = copy.deepcopy(teacher).requires_grad_(True)
    teacher.eval()
    lr = DEACL_LR_AT_256 * batch_size / 256
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    for _ in range(epochs):
        for x, _ in loader:
            x = augment(x)
            target = _frozen_features(teacher, x)
            student.eval()
            x_adv = _pgd(lambda z, t=target: -F.cosine_similarity(student(z).flatten(1), t).sum(), x, eps, 2 / 255, 5)
            student.train()
            both = student(torch.cat([x, x_adv])).flatten(1)
            clean, adversarial = both[: len(x)], both[len(x) :]
            loss = -F.cosine_similarity(clean, target).mean() - DEACL_K * F.cosine_similarity(adversarial, clean).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return student.eval()


def fare_stage(teacher: nn.Module, loader, epochs: int, eps: float, lr: float) -> nn.Module:
    student = copy.deepcopy(teacher).requires_grad_(True)
    teacher.eval()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    for _ in range(epochs):
        for x, _ in loader:
            target = _frozen_features(teacher, x)
            student.eval()
            x_adv = _pgd(lambda z, t=target: (student(z).flatten(1) - t).pow(2).sum(), x, eps, 1 / 255, 10)
            student.train()
            loss = (student(x_adv).flatten(1) - target).pow(2).sum(dim=1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    return student.eval()


def run_stage(name: str, plain: nn.Module, data, args, seed: int, epochs: int, eps: float) -> tuple[nn.Module, float]:
    """The stage ``name`` for ``epochs`` from ``plain`` (never changed); returns (encoder, seconds)."""
    torch.manual_seed(seed)
    loader = ShuffledBatches(data.x_train, data.y_train, args.batch_size, seed)
    augment = crop_flip(flip=data.kind != "digits", seed=seed)
    start = time.perf_counter()
    if name == "harden":
        schedule = FinetuneSchedule(epochs=epochs, lr=args.harden_lr, steps=3, batch_size=args.batch_size)
        encoder = harden(plain, loader, threat=ThreatModel(eps), schedule=schedule, augment=augment)
    elif name == "deacl":
        encoder = deacl_stage(plain, loader, epochs, eps, args.batch_size, augment)
    elif name == "fare":
        encoder = fare_stage(plain, loader, epochs, eps, args.fare_lr)
    else:
        raise SystemExit(f"--methods: unknown stage {name!r}; one of {', '.join(STAGES)}")
    return encoder, time.perf_counter() - start


# --- the runs ------------------------------------------------------------------------------------------------


def scored(name: str, encoder: nn.Module, data, eval_config: EvalConfig, seed: int, **fields) -> dict:
    start = time.perf_counter()
    evaluation = evaluate_encoder(encoder, data, eval_config, seed=seed)
    return {"method": name, "seed": seed, "eval_seconds": time.perf_counter() - start, **fields, **evaluation.to_dict()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    stages = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := [m for m in stages if m not in STAGES]:
        raise SystemExit(f"--methods: unknown stage(s) {', '.join(unknown)}; one of {', '.join(STAGES)}")
    multiples = [float(b) for b in args.budgets.split(",")]
    data, eval_config, epochs, report = compare.script_setup("posthoc", args, argv, quick_epochs=1)
    if args.quick:
        multiples = multiples[:1]
    eps = compare.training_defaults(data)["epsilon"]
    recipe = compare.RECIPE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["stage_budgets"] = {}
    started = time.perf_counter()

    def save() -> None:
        report["elapsed_seconds"] = time.perf_counter() - started
        compare.write_json(report, out / "results.json")

    cpu = torch.device("cpu")
    for seed in args.seeds:
        print(f"[posthoc] seed {seed}: plain simclr and the default from scratch, {epochs} epochs", flush=True)
        config = compare.row_config("simclr", data, recipe, cpu, seed, epochs)
        plain = compare.pretrain(data, config, device=cpu, progress_bar=False)
        report["runs"].append(
            scored("simclr", plain.encoder, data, eval_config, seed, epochs=epochs, train_seconds=plain.seconds)
        )
        default = compare.pretrain(
            data,
            compare.row_config("simclr+robust-reg", data, recipe, cpu, seed, epochs),
            device=cpu,
            progress_bar=False,
        )
        report["runs"].append(
            scored(
                "simclr+robust-reg",
                default.encoder,
                data,
                eval_config,
                seed,
                epochs=epochs,
                train_seconds=default.seconds,
            )
        )
        save()
        base = max(default.seconds - plain.seconds, 1.0)
        report["stage_budgets"][str(seed)] = {"plain": plain.seconds, "default": default.seconds, "B": base}
        for name in stages:
            _, one_epoch = run_stage(name, plain.encoder, data, args, seed, 1, eps)  # the timing run, unscored
            for k in multiples:
                stage_epochs = max(1, round(k * base / one_epoch))
                print(f"[posthoc] seed {seed}: {name} at {k:g}B ({k * base:.0f} s): {stage_epochs} epochs", flush=True)
                encoder, seconds = run_stage(name, plain.encoder, data, args, seed, stage_epochs, eps)
                report["runs"].append(
                    scored(
                        f"simclr+{name}[{k:g}B]",
                        encoder,
                        data,
                        eval_config,
                        seed,
                        epochs=stage_epochs,
                        train_seconds=plain.seconds + seconds,
                        post_seconds=seconds,
                    )
                )
                save()
        total = plain.seconds + max(multiples) * base
        scratch_epochs = max(1, round(total / default.seconds * epochs))
        if scratch_epochs != epochs:
            print(
                f"[posthoc] seed {seed}: the default from scratch in {total:.0f} s: {scratch_epochs} epochs", flush=True
            )
            longer = compare.pretrain(
                data,
                compare.row_config("simclr+robust-reg", data, recipe, cpu, seed, scratch_epochs),
                device=cpu,
                progress_bar=False,
            )
            report["runs"].append(
                scored(
                    f"simclr+robust-reg[{max(multiples):g}B total]",
                    longer.encoder,
                    data,
                    eval_config,
                    seed,
                    epochs=scratch_epochs,
                    train_seconds=longer.seconds,
                )
            )
            save()
    report["elapsed_seconds"] = time.perf_counter() - started
    report["paired_reference"] = "simclr+robust-reg"
    print(compare.write_outputs(report, out))
    save()
    return report


if __name__ == "__main__":
    main()
