"""The documentation: every public name has a docstring and a place in the API reference, and the
Python blocks of the getting-started and guide pages run as written.

Each page's blocks run in order in one namespace, like a notebook; the names a page says are the
reader's own (``model``, ``loader``, ``backbone``, ...) are given small real stand-ins here.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import robust_reg

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
INCLUDE = re.compile(r'^--8<-- "([^"]+)"$')
# Modules whose ``__all__`` is public API, and where the API page lists them.
PUBLIC_MODULES = {
    "robust_reg": "robust_reg",
    "robust_reg.evaluation": "robust_reg.evaluation",
    "robust_reg.sanity_checks": "robust_reg.sanity_checks",
    "robust_reg.finetune": "robust_reg.finetune",
    "robust_reg.corruptions": "robust_reg.corruptions",
    "robust_reg.embedding_attack": "robust_reg.embedding_attack",
    "robust_reg.augmentation": "robust_reg.augmentation",
    "robust_reg.integrations.lightly": "integrations.lightly",
    "robust_reg.integrations.solo_learn": "integrations.solo_learn",
}


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def run_page(page: str, namespace: dict) -> dict:
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"docs/{page} block {i}", "exec"), namespace)
    return namespace


def _public_names() -> list[tuple[str, str]]:
    return [(module, name) for module in PUBLIC_MODULES for name in importlib.import_module(module).__all__]


def _api_entries() -> set[str]:
    """Every object the API page renders: ``::: path`` directives and their ``members`` lists."""
    entries, current = set(), None
    for line in (DOCS / "api.md").read_text().splitlines():
        if line.startswith("::: "):
            current = line[4:].strip()
            entries.add(current)
        elif current and re.match(r"\s+- \w+$", line):
            entries.add(f"{current}.{line.strip()[2:]}")
    return entries


def _rendered(entry: str) -> object:
    """The object an API-page entry renders (the page names the adapters by their source path)."""
    module, _, name = entry.rpartition(".")
    modules = {path: module for module, path in PUBLIC_MODULES.items()}
    if entry in modules:
        return importlib.import_module(modules[entry])
    return getattr(importlib.import_module(modules.get(module, module)), name)


@pytest.mark.parametrize("module, name", _public_names())
def test_every_public_name_is_in_the_api_reference(module, name):
    obj = getattr(importlib.import_module(module), name)
    # A name re-exported by a second public module (SanityCheck) is rendered once.
    assert any(_rendered(entry) is obj for entry in _api_entries()), f"docs/api.md does not render {module}.{name}"


@pytest.mark.parametrize("module, name", _public_names())
def test_every_public_function_and_class_has_its_own_docstring(module, name):
    obj = getattr(importlib.import_module(module), name)
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        pytest.skip(f"{name} is a constant, documented by its module")
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__
    assert doc and doc.strip(), f"{module}.{name} has no docstring of its own"


def test_every_page_the_site_links_exists():
    text = (ROOT / "mkdocs.yml").read_text()
    pages = re.findall(r":\s+([\w/.-]+\.md)\s*$", text, re.M) + re.findall(r"^\s+- ([\w/.-]+\.md)\s*$", text, re.M)
    assert pages and all((DOCS / page).is_file() for page in pages), [p for p in pages if not (DOCS / p).is_file()]


def test_the_plain_pytorch_page_shows_the_snippets_the_tests_run():
    blocks = python_blocks("guides/plain-pytorch.md")
    included = [INCLUDE.match(block.strip()).group(1) for block in blocks]
    assert included == [f"examples/snippets/{n}.py" for n in ("common", "simclr", "byol", "mocov3", "vicreg")]
    assert all((ROOT / path).is_file() for path in included)


# --- stand-ins for what the pages call the reader's own --------------------------------------------


def _embedding_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 16))


def _ssl_loop(indexed: bool, size: int = 16) -> dict:
    lightly_loss = pytest.importorskip("lightly.loss")
    torch.manual_seed(0)
    model = _embedding_model()
    images = torch.rand(16, 3, size, size)
    second = torch.arange(8, 16) if indexed else torch.zeros(8)
    return {
        "loader": [(images[:8], torch.arange(8) if indexed else torch.zeros(8)), (images[8:], second)],
        "augment": lambda x: (x + 0.01 * torch.randn_like(x)).clamp(0, 1),
        "model": model,
        "criterion": lightly_loss.NTXentLoss(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "num_samples": 16,
        "eps": 8 / 255,
    }


def _labelled(n: int = 32) -> dict:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    x, y = torch.rand(2 * n, 3, 12, 12), torch.arange(2 * n) % 10
    return {
        "backbone": backbone,
        "train_loader": [(x[:n], y[:n])],
        "test_loader": [(x[n:], y[n:])],
        "x_test": x[n:],
        "y_test": y[n:],
    }


def _changed(before: list[torch.Tensor], model: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_getting_started_page_runs_as_written():
    namespace = {**_ssl_loop(indexed=False), **_labelled()}
    before = [p.detach().clone() for p in namespace["model"].parameters()]
    run_page("getting-started.md", namespace)
    assert _changed(before, namespace["model"])
    assert 0.0 <= namespace["ev"].robust_accuracy(8 / 255) <= 1.0


def test_the_warm_start_page_runs_as_written():
    namespace = _ssl_loop(indexed=True, size=32)
    crop = pytest.importorskip("torchvision.transforms").RandomResizedCrop

    def crop_and_flip(x):
        boxes = torch.tensor([crop.get_params(image, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)) for image in x])
        flipped = torch.rand(x.shape[0]) < 0.5
        views = [
            nn.functional.interpolate(image[None, :, t : t + h, left : left + w], size=(32, 32), mode="bilinear")[0]
            for image, (t, left, h, w) in zip(x, boxes.tolist())
        ]
        views = torch.stack(views)
        return torch.where(flipped[:, None, None, None], views.flip(-1), views).clamp(0, 1), boxes, flipped

    namespace["crop_and_flip"] = crop_and_flip
    run_page("guides/warm-start.md", namespace)
    assert namespace["memory"].is_stored(torch.arange(16)).all()


def test_the_bound_page_runs_as_written():
    namespace = run_page("guides/bound.md", _labelled())
    assert namespace["report"].adversarial_loss <= namespace["report"].bound
    assert len(namespace["curve"].reports) == 3


def test_the_evaluation_page_runs_as_written():
    namespace = _labelled()
    namespace["head"] = robust_reg.fit_linear_probe(namespace["backbone"], namespace["train_loader"], num_classes=10)
    run_page("guides/evaluation.md", namespace)
    assert namespace["robust"] <= namespace["pgd"]


def test_the_pretrained_backbone_page_runs_as_written():
    namespace = _labelled()
    before = [p.detach().clone() for p in namespace["backbone"].parameters()]
    run_page("guides/pretrained.md", namespace)
    assert not _changed(before, namespace["backbone"])  # the original is the frozen teacher
    assert namespace["robust"] is not namespace["backbone"] and 0.0 <= namespace["ev"].robust_accuracy(8 / 255) <= 1


def test_the_distributed_page_runs_as_written_outside_a_process_group():
    namespace = run_page("guides/distributed.md", {})
    assert namespace["reg"].gather_distributed


def test_the_lightly_page_runs_as_written(tmp_path):
    pytest.importorskip("lightly")
    import lightly_modules

    namespace = {
        "SimCLR": lightly_modules.SimCLR,
        "trainer": lightly_modules.trainer(tmp_path),
        "dataloader": lightly_modules.loader(),
    }
    run_page("guides/lightly.md", namespace)
    from robust_reg.integrations.lightly import is_robustified

    assert is_robustified(namespace["model"])
    assert namespace["trainer"].global_step == 2


def test_the_fine_tuning_modes_page_runs_as_written():
    namespace = _labelled(n=32)
    x, y = torch.rand(64, 3, 32, 32), torch.arange(64) % 10
    namespace.update(encoder=namespace.pop("backbone"), train_loader=[(x[:32], y[:32])], x_test=x[32:], y_test=y[32:])
    before = [p.detach().clone() for p in namespace["encoder"].parameters()]
    run_page("protocols.md", namespace)
    assert not _changed(before, namespace["encoder"])  # ALF and AFF leave the caller's encoder as it was
    assert namespace["foggy"].shape == namespace["x_test"].shape


def test_the_peers_page_runs_as_written():
    pl = pytest.importorskip("pytorch_lightning")
    torch.manual_seed(0)
    namespace = {"epochs": 3, "loader": [(torch.rand(4, 3, 32, 32), None)], "pl": pl, "dataset": type("D", (), {})()}
    namespace = run_page("peers.md", namespace)
    assert namespace["x1"].shape == (4, 3, 32, 32)
    assert len(namespace["trainer"].callbacks) > 0
