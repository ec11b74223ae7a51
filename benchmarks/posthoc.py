"""The post-hoc benchmark: robustify a plainly pretrained encoder, against DeACL and FARE, at equal stage budgets.

Per seed, in one process: plain SimCLR trained for the recipe's epochs (its time P) and robust-reg's default
from scratch (its time R: the record budget). The stage budget B = R - P, the time the default spends beyond
plain pretraining; each stage method gets multiples of B (``--budgets``, e.g. 0.5B and B) from the same plain
encoder, its epochs set from an unscored 1-epoch timing run in the same process. The from-scratch default at
each stage budget's total time (P + kB; at 1B the default's own row) is a row too. Every row is scored like
the record (``compare.py``'s evaluation; ``--lean-eval``: its headline attacks only) and written in its report
format, so ``compare.py --render`` merges seeds and prints the paired differences.

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

Each stage runs at the rate its validation screen chose (``benchmarks/results/screen-cifar10-subset/``,
``posthoc-*-seed0``; the authors' rates are far too small here). ``--resume`` adds rows to OUT from its saved
plain encoders and budgets.

Command of record (per seed N, one thread per process; then ``--render`` merges the seeds and writes the targets):

    OMP_NUM_THREADS=1 python benchmarks/posthoc.py --dataset cifar10-subset \
        --data-path ../shared/cifar10-subset/cifar10_subset.npz --split test --seeds N --aa-samples 500 \
        --lean-eval --alf --budgets 0.5,1 --harden-lr 2.0 --deacl-lr 4.0 --fare-lr 3e-2 \
        --out benchmarks/results/posthoc-cifar10-subset/seedN
    python benchmarks/posthoc.py --render benchmarks/results/posthoc-cifar10-subset/seed*/results.json \
        --out benchmarks/results/posthoc-cifar10-subset
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402

from robust_reg import HARDEN_CPU, ThreatModel, harden  # noqa: E402
from robust_reg.demo.checkpoints import load_checkpoint  # noqa: E402
from robust_reg.demo.pipeline import EvalConfig, ShuffledBatches, crop_flip, evaluate_encoder  # noqa: E402
from robust_reg.finetune import FinetuneSchedule  # noqa: E402

STAGES = ("harden", "deacl", "fare")
DEACL_LR_AT_256 = 0.5
DEACL_K = 2.0  # trades_k in DeACL's CIFAR-10 script


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = compare.script_arguments(__doc__.split("\n\n")[0])
    p.add_argument(
        "--methods",
        default=",".join(STAGES),
        help=f"stage methods among {', '.join(STAGES)}, each optionally [lr=X] (e.g. harden[lr=0.05])",
    )
    p.add_argument("--budgets", default="1,2", help="stage budgets, multiples of B = (default's time - plain's)")
    p.add_argument("--batch-size", type=int, default=128, help="the stages' batch size")
    p.add_argument("--harden-lr", type=float, default=HARDEN_CPU.lr, help="default: robust_reg.HARDEN_CPU's")
    p.add_argument("--deacl-lr", type=float, default=None, help="default: the authors' 0.5 at batch 256, scaled")
    p.add_argument("--fare-lr", type=float, default=1e-5, help="default: the authors' (for CLIP)")
    p.add_argument("--resume", action="store_true", help="add to OUT/results.json: reuse its plain encoders and B")
    p.add_argument("--paired-reference", default="simclr+robust-reg", help="the row the paired table compares to")
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


def _clean_alignment(teacher: nn.Module) -> Callable[[nn.Module, Tensor], Tensor]:
    """``ssl_loss`` for harden: the student's clean embedding aligned to the teacher's (2 - 2 cos, DeACL's clean
    term); the teacher's forward runs again here, and is timed with the stage."""
    teacher.eval()

    def loss(student: nn.Module, x: Tensor) -> Tensor:
        target = _frozen_features(teacher, x)
        return (2 - 2 * F.cosine_similarity(student(x).flatten(1), target, dim=1)).mean()

    return loss


def deacl_stage(
    teacher: nn.Module, loader, epochs: int, eps: float, batch_size: int, augment, lr: float | None = None
) -> nn.Module:
    student = copy.deepcopy(teacher).requires_grad_(True)
    teacher.eval()
    lr = lr or DEACL_LR_AT_256 * batch_size / 256
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


def run_stage(
    name: str,
    plain: nn.Module,
    data,
    args,
    seed: int,
    epochs: int,
    eps: float,
    lr: float | None = None,
    decay: bool = False,
    weight: float = 1.0,
    clean: bool = False,
) -> tuple[nn.Module, float]:
    """The stage ``name`` for ``epochs`` from ``plain`` (never changed), at ``lr`` (default: the stage's option;
    ``decay``, ``weight`` and ``clean``: harden's variants, see ``parse_stage``); returns (encoder, seconds)."""
    torch.manual_seed(seed)
    loader = ShuffledBatches(data.x_train, data.y_train, args.batch_size, seed)
    augment = crop_flip(flip=data.kind != "digits", seed=seed)
    start = time.perf_counter()
    if name == "harden":
        milestones = tuple(sorted({max(1, round(f * epochs)) for f in (0.6, 0.8)})) if decay else ()
        schedule = FinetuneSchedule(
            epochs=epochs, lr=lr or args.harden_lr, milestones=milestones, steps=3, batch_size=args.batch_size
        )
        extra = {"ssl_loss": _clean_alignment(plain)} if clean else {}
        encoder = harden(
            plain, loader, threat=ThreatModel(eps), schedule=schedule, augment=augment, weight=weight, **extra
        )
    elif name == "deacl":
        encoder = deacl_stage(plain, loader, epochs, eps, args.batch_size, augment, lr or args.deacl_lr)
    elif name == "fare":
        encoder = fare_stage(plain, loader, epochs, eps, lr or args.fare_lr)
    else:
        raise SystemExit(f"--methods: unknown stage {name!r}; one of {', '.join(STAGES)}")
    return encoder, time.perf_counter() - start


# --- the runs ------------------------------------------------------------------------------------------------


def scored(name: str, encoder: nn.Module, data, eval_config: EvalConfig, seed: int, **fields) -> dict:
    start = time.perf_counter()
    evaluation = evaluate_encoder(encoder, data, eval_config, seed=seed)
    return {"method": name, "seed": seed, "eval_seconds": time.perf_counter() - start, **fields, **evaluation.to_dict()}


def targets_markdown(runs: list[dict], eps: float) -> str:
    """The issue's targets, paired by seed at each stage budget: each harden row (``harden``, ``harden[...]``)
    against DeACL, FARE and the from-scratch default at the same total time (at 1B: the default's own row).
    DeACL's and FARE's rows are matched by the stage's name (one variant of each per report)."""
    methods = list(dict.fromkeys(r["method"] for r in runs))
    budgets = sorted({m.rsplit("[", 1)[1][:-2] for m in methods if m.endswith("B]") and "scratch" not in m})
    hardens = list(dict.fromkeys(m[len("simclr+") : m.rindex("[")] for m in methods if m.startswith("simclr+harden")))
    lines = [
        f"Targets at eps {eps:.4g}: each harden row minus the other, paired by seed (robust = per-sample worst "
        "case; 95 % t-interval over seeds)",
        "",
        "| budget | row | minus | seeds | Δ robust | [95 %] | verdict | Δ clean | [95 %] |",
        "|---|---|---|---|---:|---|---|---:|---|",
    ]

    def interval(x: dict) -> str:
        return "–" if x["low"] is None else f"[{100 * x['low']:+.1f}, {100 * x['high']:+.1f}]"

    for k in budgets:
        scratch = "simclr+robust-reg" if k == "1" else f"simclr+robust-reg[scratch {k}B]"
        others = {
            "DeACL": [r for r in runs if r["method"].startswith("simclr+deacl") and r["method"].endswith(f"[{k}B]")],
            "FARE": [r for r in runs if r["method"].startswith("simclr+fare") and r["method"].endswith(f"[{k}B]")],
            "the default from scratch, same total time": [r for r in runs if r["method"] == scratch],
        }
        for ours in hardens:
            mine = [dict(r, method=ours) for r in runs if r["method"] == f"simclr+{ours}[{k}B]"]
            for label, rows in others.items():
                if not mine or not rows:
                    continue
                (d,) = compare.paired_differences([dict(r, method=label) for r in rows] + mine, eps, label)
                rob, cln = d["robust"], d["clean"]
                lines.append(
                    f"| {k}B | `{ours}` | {label} | {len(d['seeds'])} | {100 * rob['mean']:+.1f} | {interval(rob)} | "
                    f"{rob['verdict']} | {100 * cln['mean']:+.1f} | {interval(cln)} |"
                )
    return "\n".join(lines) if len(lines) > 4 else ""


def render(paths: list[str], out: Path) -> dict:
    """Merge one process's report per seed, write the tables (``results.md``, ``targets.md``) and plots."""
    reports = [json.loads(Path(path).read_text()) for path in paths]
    report = compare.merge_reports(reports)
    report["stage_budgets"] = {seed: b for one in reports for seed, b in one.get("stage_budgets", {}).items()}
    out.mkdir(parents=True, exist_ok=True)
    text = compare.write_outputs(report, out)
    targets = targets_markdown(report["runs"], max(report["eval"]["epsilons"]))
    (out / "targets.md").write_text(targets + "\n")
    print(text + "\n" + targets)
    compare.write_json(report, out / "results.json")
    return report


HARDEN_VARIANTS = {"lr": float, "decay": bool, "weight": float, "clean": bool}


def parse_stage(spec: str) -> tuple[str, dict]:
    """``harden`` or ``harden[lr=0.05]`` -> ``("harden", {"lr": 0.05})``. Every stage takes ``lr``; ``harden``
    also ``decay=true`` (the rate times 0.1 after 60 % and 80 % of the epochs), ``weight`` (the penalty's) and
    ``clean=true`` (DeACL's clean term beside: the student's clean embedding aligned to the teacher's, through
    ``harden``'s ``ssl_loss``)."""
    name, _, rest = spec.partition("[")
    if name not in STAGES:
        raise SystemExit(f"--methods: unknown stage {name!r}; one of {', '.join(STAGES)}")
    allowed = HARDEN_VARIANTS if name == "harden" else {"lr": float}
    overrides: dict = {}
    for item in filter(None, rest.rstrip("]").split(",")):
        key, _, value = (part.strip() for part in item.partition("="))
        if key not in allowed or not value:
            raise SystemExit(f"--methods: {spec!r}: {name}'s variants are {', '.join(f'[{k}=...]' for k in allowed)}")
        overrides[key] = value.lower() in ("1", "true", "yes") if allowed[key] is bool else allowed[key](value)
    return name, overrides


def main(argv: list[str] | None = None) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if "--render" in argv:  # only merge and re-draw: no other option applies
        p = argparse.ArgumentParser(description="merge the seeds' reports and write the tables")
        p.add_argument("--render", nargs="+", required=True, metavar="RESULTS_JSON")
        p.add_argument("--out", required=True)
        options = p.parse_args(argv)
        return render(options.render, Path(options.out))
    args = parse_args(argv)
    specs = compare.split_methods(args.methods)
    stages = [(spec, *parse_stage(spec)) for spec in specs]
    multiples = [float(b) for b in args.budgets.split(",")]
    data, eval_config, epochs, report = compare.script_setup("posthoc", args, argv, quick_epochs=1)
    if args.quick:
        multiples = multiples[:1]
    eps = compare.training_defaults(data)["epsilon"]
    recipe = compare.RECIPE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report["stage_budgets"] = {}
    previous = 0.0
    if args.resume:
        done = json.loads((out / "results.json").read_text())
        if done.get("split") != args.split:
            raise SystemExit(f"--resume: {out / 'results.json'} was scored on the {done.get('split')} split")
        report.update(runs=done["runs"], stage_budgets=done["stage_budgets"])
        report["command"] = done["command"] + " (resumed: " + report["command"] + ")"
        previous = done.get("elapsed_seconds", 0.0)
    started = time.perf_counter() - previous

    def save() -> None:
        report["elapsed_seconds"] = time.perf_counter() - started
        compare.write_json(report, out / "results.json")

    def done_before(name: str, seed: int) -> bool:
        return any(r["method"] == name and r["seed"] == seed for r in report["runs"])

    # ALF (with --alf) at the record budget only: the default and the stages at 1B.
    slf_only = dataclasses.replace(eval_config, protocols=("slf",))

    def add(name: str, encoder: nn.Module, seed: int, record_budget: bool = False, **fields) -> None:
        print(f"[posthoc] seed {seed}: scoring {name}", flush=True)
        config = eval_config if record_budget else slf_only
        report["runs"].append(scored(name, encoder, data, config, seed, **fields))
        save()

    cpu = torch.device("cpu")
    for seed in args.seeds:
        plain_file = out / "encoders" / f"simclr_seed{seed}.pt"
        if str(seed) in report["stage_budgets"] and plain_file.is_file():
            plain_encoder = load_checkpoint(plain_file)[0]
            budgets = report["stage_budgets"][str(seed)]
            print(f"[posthoc] seed {seed}: plain encoder and B = {budgets['B']:.0f} s from {out}", flush=True)
        else:
            print(f"[posthoc] seed {seed}: plain simclr and the default from scratch, {epochs} epochs", flush=True)
            config = compare.row_config("simclr", data, recipe, cpu, seed, epochs)
            plain = compare.pretrain(data, config, device=cpu, progress_bar=False)
            plain.save(plain_file)
            plain_encoder = plain.encoder
            add("simclr", plain.encoder, seed, epochs=epochs, train_seconds=plain.seconds)
            config = compare.row_config("simclr+robust-reg", data, recipe, cpu, seed, epochs)
            default = compare.pretrain(data, config, device=cpu, progress_bar=False)
            budgets = {
                "plain": plain.seconds,
                "default": default.seconds,
                "B": max(default.seconds - plain.seconds, 1.0),
            }
            report["stage_budgets"][str(seed)] = budgets
            add("simclr+robust-reg", default.encoder, seed, True, epochs=epochs, train_seconds=default.seconds)
        base = budgets["B"]
        for spec, name, overrides in stages:
            todo = [k for k in multiples if not done_before(f"simclr+{spec}[{k:g}B]", seed)]
            if not todo:
                continue
            _, one_epoch = run_stage(name, plain_encoder, data, args, seed, 1, eps, **overrides)  # timing, unscored
            for k in todo:
                stage_epochs = max(1, round(k * base / one_epoch))
                print(f"[posthoc] seed {seed}: {spec} at {k:g}B ({k * base:.0f} s): {stage_epochs} epochs", flush=True)
                encoder, seconds = run_stage(name, plain_encoder, data, args, seed, stage_epochs, eps, **overrides)
                fields = {"epochs": stage_epochs, "train_seconds": budgets["plain"] + seconds, "post_seconds": seconds}
                add(f"simclr+{spec}[{k:g}B]", encoder, seed, k == 1, **fields)
        for k in multiples:
            # The from-scratch default at each stage budget's total time (at 1B that is the default's own row).
            total = budgets["plain"] + k * base
            scratch_epochs = max(1, round(total / budgets["default"] * epochs))
            name = f"simclr+robust-reg[scratch {k:g}B]"
            if scratch_epochs == epochs or done_before(name, seed):
                continue
            print(
                f"[posthoc] seed {seed}: the default from scratch in {total:.0f} s: {scratch_epochs} epochs", flush=True
            )
            config = compare.row_config("simclr+robust-reg", data, recipe, cpu, seed, scratch_epochs)
            longer = compare.pretrain(data, config, device=cpu, progress_bar=False)
            add(name, longer.encoder, seed, epochs=scratch_epochs, train_seconds=longer.seconds)
    report["elapsed_seconds"] = time.perf_counter() - started
    report["paired_reference"] = args.paired_reference
    print(compare.write_outputs(report, out))
    save()
    return report


if __name__ == "__main__":
    main()
