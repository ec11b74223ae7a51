"""The command line as users meet it: a bad argument or file is one line on stderr, exit status 2, nothing done."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("lightly")

import robust_reg.demo.data as data_module  # noqa: E402
import robust_reg.demo.training as training_module  # noqa: E402
from robust_reg.cli import UsageError  # noqa: E402
from robust_reg.cli import main as cli  # noqa: E402
from robust_reg.demo.checkpoints import save_checkpoint  # noqa: E402
from robust_reg.demo.models import build_encoder  # noqa: E402


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Loading data or training during a rejected command fails the test: errors come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the command did work before rejecting its arguments")

    monkeypatch.setattr(data_module, "load_dataset", forbidden)
    monkeypatch.setattr(training_module, "pretrain", forbidden)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "cnn.pt", build_encoder("cnn", 1), arch="cnn", dataset="mnist5k")


@pytest.fixture
def bare(checkpoint, tmp_path):
    """The same weights as a bare state_dict (no architecture recorded)."""
    path = tmp_path / "bare.pt"
    torch.save(torch.load(checkpoint, weights_only=True)["state_dict"], path)
    return path


def rejected(argv: list[str], capsys) -> str:
    """Run the command; check exit status 2 and a single-line error without traceback; return the line."""
    try:
        code = cli(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "args, named",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "ten"], "--epochs"),
        (["--weight", "-1"], "--weight"),
        (["--weight", "inf"], "--weight"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--steps", "-1"], "--steps"),
        (["--device", "tpu"], "--device"),
        (["--dataset", "imagenet"], "--dataset"),
    ],
)
def test_demo_rejects_a_bad_argument_by_name_before_training(args, named, tmp_path, capsys):
    out = tmp_path / "out"
    line = rejected(["demo", "--out", str(out), *args], capsys)
    assert named in line
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["demo", "evaluate"])
def test_device_cuda_without_a_gpu_is_rejected(command, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [command, *([str(checkpoint)] if command == "evaluate" else []), "--device", "cuda", "--out", str(out)]
    line = rejected(argv, capsys)
    assert "--device cuda" in line and "no CUDA GPU" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "args, named",
    [
        (["--aa-samples", "-5"], "--aa-samples"),
        (["--aa-samples", "0"], "--aa-samples"),
        (["--test-samples", "0"], "--test-samples"),
        (["--pgd-steps", "0"], "--pgd-steps"),
        (["--epsilons", "0.1", "-0.1"], "--epsilons"),
        (["--in-channels", "0"], "--in-channels"),
        (["--full", "--aa-samples", "10"], "--full"),
    ],
)
def test_evaluate_rejects_a_bad_argument_by_name_before_loading(args, named, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    line = rejected(["evaluate", str(checkpoint), "--out", str(out), *args], capsys)
    assert named in line
    assert not out.exists()


def test_evaluate_names_a_missing_checkpoint(tmp_path, capsys):
    line = rejected(["evaluate", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")], capsys)
    assert "nope.pt" in line and "no such file" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [os.urandom(2048), b"hello, this is a text file\n"], ids=["random", "text"])
def test_evaluate_rejects_a_file_that_is_no_checkpoint(content, tmp_path, capsys):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    line = rejected(["evaluate", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "not a robust-reg checkpoint or state_dict" in line
    assert not (tmp_path / "out").exists()


def test_evaluate_names_the_keys_that_do_not_fit_the_architecture(bare, tmp_path, capsys):
    argv = ["evaluate", str(bare), "--arch", "resnet18", "--in-channels", "1", "--dataset", "mnist5k"]
    line = rejected([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "does not fit --arch resnet18" in line
    assert "unexpected keys 3.weight" in line and "missing keys 4.0.conv1.weight" in line
    assert "--arch resnet18 expects keys 0.weight, 1.weight, 1.bias" in line
    assert not (tmp_path / "out").exists()


def test_evaluate_names_a_channel_mismatch_by_shape(bare, tmp_path, capsys):
    argv = ["evaluate", str(bare), "--arch", "cnn", "--in-channels", "3", "--dataset", "mnist5k"]
    line = rejected([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "0.weight (32, 1, 5, 5) (expected (32, 3, 5, 5))" in line


def test_evaluate_asks_for_the_architecture_of_a_bare_state_dict(bare, tmp_path, capsys):
    line = rejected(["evaluate", str(bare), "--dataset", "mnist5k", "--out", str(tmp_path / "out")], capsys)
    assert "bare state_dict" in line and "--arch" in line and "--in-channels" in line


def test_evaluate_names_a_dataset_that_needs_a_download(checkpoint, tmp_path, capsys):
    argv = ["evaluate", str(checkpoint), "--dataset", "cifar10", "--data-root", str(tmp_path / "none")]
    line = rejected([*argv, "--out", str(tmp_path / "out")], capsys)
    assert "--dataset cifar10" in line and "--download" in line


def test_debug_raises_instead_of_printing_one_line(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        cli(["evaluate", str(tmp_path / "nope.pt"), "--debug"])


def test_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The real console entry point, as a user runs it (a subprocess; stdout stays empty)."""
    code = "from robust_reg.cli import main; raise SystemExit(main())"
    argv = [sys.executable, "-c", code, "evaluate", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


def test_evaluate_help_states_the_default_budget(capsys):
    with pytest.raises(SystemExit):
        cli(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default budget" in text and "--full" in text


@pytest.mark.parametrize("dataset", ["npz", "cifar10-subset"])
def test_evaluate_names_data_path_for_a_dataset_read_from_a_file(checkpoint, tmp_path, capsys, dataset):
    line = rejected(["evaluate", str(checkpoint), "--dataset", dataset, "--out", str(tmp_path / "out")], capsys)
    assert f"--dataset {dataset}" in line and "--data-path FILE" in line
    assert not (tmp_path / "out").exists()


# The trust issue's command-line cases: one line, exit status 2, nothing written, before any probe is fitted.


@pytest.fixture
def rgb_data(monkeypatch):
    """``--dataset npz`` loads small 3-channel 32x32 images; the evaluation itself must never start."""
    import robust_reg.demo.pipeline as pipeline

    data = data_module.ImageData(
        "npz",
        torch.rand(40, 3, 32, 32),
        torch.arange(40) % 10,
        torch.rand(20, 3, 32, 32),
        torch.arange(20) % 10,
        10,
        kind="natural",
    )
    monkeypatch.setattr(data_module, "load_dataset", lambda *args, **kwargs: data)
    monkeypatch.setattr(pipeline, "evaluate_encoder", lambda *a, **k: pytest.fail("the evaluation started"))
    return ["--dataset", "npz", "--data-path", "unused.npz"]


@pytest.mark.parametrize("epsilon", ["8", "0.6"])
def test_evaluate_an_epsilon_in_the_wrong_unit_is_one_line_with_the_fix(epsilon, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    line = rejected(["evaluate", str(checkpoint), "--epsilons", epsilon, "--out", str(out)], capsys)
    assert f"--epsilons={epsilon} with norm='linf'" in line and f"Did you mean --epsilons={epsilon}/255" in line
    assert not out.exists()


def test_demo_an_epsilon_in_the_wrong_unit_is_one_line_with_the_fix(tmp_path, capsys):
    out = tmp_path / "out"
    line = rejected(["demo", "--epsilon", "8", "--out", str(out)], capsys)
    assert "--epsilon=8 with norm='linf'" in line and "Did you mean --epsilon=8/255" in line
    assert not out.exists()


def test_radii_are_accepted_as_fractions():
    from robust_reg.cli import build_parser

    args = build_parser().parse_args(["evaluate", "x.pt", "--epsilons", "4/255", "8/255"])
    assert args.epsilons == [4 / 255, 8 / 255]


def test_evaluate_an_linf_radius_given_as_l2_is_one_line(checkpoint, rgb_data, tmp_path, capsys):
    rgb = save_checkpoint(tmp_path / "rgb.pt", build_encoder("cnn", 3), arch="cnn", dataset="npz")
    out = tmp_path / "out"
    line = rejected(["evaluate", str(rgb), *rgb_data, "--norm", "l2", "--epsilons", "8/255", "--out", str(out)], capsys)
    assert "--epsilons=0.03137 (= 8/255) with norm='l2'" in line and "an L-inf radius given as L2" in line
    assert not out.exists()


def test_evaluate_a_checkpoint_of_other_channels_than_the_dataset_is_one_line(checkpoint, rgb_data, tmp_path, capsys):
    out = tmp_path / "out"
    line = rejected(["evaluate", str(checkpoint), *rgb_data, "--out", str(out)], capsys)  # an MNIST encoder
    assert "takes 1-channel images (mnist5k) but --dataset npz has 3 channels" in line
    assert "--dataset mnist5k" in line
    assert not out.exists()


def test_evaluate_a_python_file_as_checkpoint_is_one_line_never_cut_mid_word(tmp_path, capsys):
    path = tmp_path / "train.py"
    path.write_text("import torch\n\nprint('a training script, not a checkpoint: ' * 20)\n")
    line = rejected(["evaluate", str(path), "--out", str(tmp_path / "out")], capsys)
    assert line.endswith(
        "is not a robust-reg checkpoint or state_dict (a Python source file, not a file torch.save writes)"
    )
    assert not (tmp_path / "out").exists()


def test_a_long_load_error_is_shortened_at_a_word_boundary(tmp_path, capsys):
    path = tmp_path / "broken.pt"
    path.write_bytes(b"PK\x03\x04" + b"not really a zip archive " * 40)  # looks like torch.save's zip, is not
    with pytest.raises(Exception) as loading:
        torch.load(path, weights_only=True)
    full = str(loading.value).strip().splitlines()[0]
    line = rejected(["evaluate", str(path), "--out", str(tmp_path / "out")], capsys)
    kept = line.split("state_dict (", 1)[1].removesuffix(")").removesuffix(" ...")
    assert len(full) > 160 and len(kept) < len(full)  # the case being tested: a message too long for one line
    assert full.startswith(kept) and full[len(kept)] == " "  # cut between two words


@pytest.mark.parametrize(
    "args, named",
    [
        (["--epochs", "0"], "--epochs"),
        (["--lr", "-1"], "--lr"),
        (["--weight", "-1"], "--weight"),
        (["--steps", "0"], "--steps"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epsilon", "nan"], "--epsilon"),
        (["--epsilon", "8"], "8/255"),
    ],
)
def test_harden_rejects_a_bad_argument_by_name_before_loading(args, named, checkpoint, tmp_path, capsys):
    out = tmp_path / "h.pt"
    line = rejected(["harden", str(checkpoint), "--out", str(out), *args], capsys)
    assert named in line
    assert not out.exists()


def test_harden_names_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    line = rejected(["harden", str(tmp_path / "nope.pt"), "--dataset", "digits"], capsys)
    assert "nope.pt" in line and "no such file" in line


def test_harden_never_overwrites_without_being_asked(checkpoint, tmp_path, capsys):
    out = tmp_path / "h.pt"
    out.write_bytes(b"mine")
    line = rejected(["harden", str(checkpoint), "--out", str(out)], capsys)
    assert "--overwrite" in line and out.read_bytes() == b"mine"
