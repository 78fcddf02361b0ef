"""The CLI's argument checks, clear errors and start-up (issue 9, section 3 and the CLI items of section 4).

Every refusal is one ``error:`` line and exit code 2, given before the model loads where the argument does
not need the model (the tests replace the loader with one that fails, to prove it never ran), and right after
loading, before any computation, where it does (layers, class ranges). Offline: the embedded model, or
torchvision architectures with random weights.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cnnlens
import cnnlens.cli as cli
from cnnlens.cli.args import LineProgress, parse_options
from cnnlens.data import write_sample_images
from cnnlens.errors import (
    NonFiniteInputError,
    NonFiniteOutputError,
    OptionError,
    UsageError,
)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    write_sample_images(folder, ["chelsea"])
    return folder


@pytest.fixture(scope="module")
def dataset(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled image folder for ``run``: one class folder holding the chelsea photo."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "cat").mkdir()
    (root / "cat" / "chelsea.png").write_bytes((photos / "chelsea.png").read_bytes())
    return root


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model load fails the test: the argument must be refused before."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("cnnlens.runs.model.load_run_model", refuse)
    monkeypatch.setattr("cnnlens.models.load_model", refuse)


@pytest.fixture
def no_compute(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any explain() call fails the test: the argument must be refused right after loading."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("explain() ran before the arguments were checked")

    monkeypatch.setattr(importlib.import_module("cnnlens.explain"), "explain", refuse)


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------------------------------------
# start-up: --help, --version and usage errors never import torch
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["explain", "--help"], ["run", "--help"], ["features", "--help"], ["--version"], ["explain"]],
)
def test_help_version_and_usage_errors_do_not_import_torch(argv: list[str]) -> None:
    code = (
        "import sys\nfrom cnnlens.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT', file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "LIGHT", done.stderr  # before: torch, 4-6.5 s every call


def test_every_command_help_imports_no_torch_and_every_command_is_dispatched() -> None:
    from cnnlens.cli import COMMANDS

    choices = cli._build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(choices) == set(COMMANDS)  # one dispatch table, one entry per sub-command
    code = (
        "import sys\nfrom cnnlens.cli import main, COMMANDS\nfor command in COMMANDS:\n"
        "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'LIGHT', len(COMMANDS), file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stderr.strip().splitlines()[-1] == f"LIGHT {len(COMMANDS)}", done.stderr[-2000:]


def test_python_m_cnnlens_runs_help_imports_no_torch() -> None:
    # before: cnnlens.runs imported all its submodules (and torch) eagerly, so `python -m cnnlens.runs --help` took
    # as long as a run's start-up
    code = (
        "import sys\nfrom cnnlens.runs.__main__ import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
        "    pass\nprint('TORCH' if 'torch' in sys.modules else 'LIGHT', file=sys.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "LIGHT", done.stderr[-2000:]
    assert "run" in done.stdout and "report" in done.stdout


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"cnnlens {cnnlens.__version__}"


def test_light_names_match_the_registry_zoo_and_package() -> None:
    from importlib.metadata import version

    from cnnlens import _names
    from cnnlens.data.images import DEFAULT_MAX_PIXELS
    from cnnlens.methods import method_ids
    from cnnlens.models import DEFAULT_MODEL, available_models

    assert list(_names.METHOD_IDS) == method_ids()
    assert list(_names.ZOO_MODELS) == available_models()
    assert _names.DEFAULT_MODEL == DEFAULT_MODEL
    assert _names.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS
    assert _names.__version__ == version("cnnlens")


def test_lazy_package_keeps_its_api() -> None:
    import cnnlens.capture
    from cnnlens.explain import explain

    assert cnnlens.explain is explain
    assert callable(cnnlens.capture) and cnnlens.capture.__name__ == "capture"
    assert "load_model" in dir(cnnlens)
    with pytest.raises(AttributeError):
        _ = cnnlens.no_such_name  # type: ignore[attr-defined]


def test_verbose_after_the_subcommand(photos: Path, tmp_path: Path) -> None:
    parser = cli._build_parser()
    assert parser.parse_args(["methods", "-v"]).verbose is True  # before: "unrecognized arguments: -v"
    assert parser.parse_args(["-v", "methods"]).verbose is True
    assert parser.parse_args(["methods"]).verbose is False


# --------------------------------------------------------------------------------------------------------
# refused before the model loads
# --------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_model")
def test_out_naming_an_existing_file(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "results.txt"
    target.write_text("mine")
    assert cli.main(["explain", str(photos), "--out", str(target)]) == 2
    assert "is an existing file, not a folder" in _error(capsys)
    assert target.read_text() == "mine"
    assert cli.main(["explain", str(photos), "--out", str(target / "sub")]) == 2
    assert "is a file, not a folder" in _error(capsys)


@pytest.mark.usefixtures("no_model")
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["explain", str(photos), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "no usable CUDA GPU" in _error(capsys)
    assert cli.main(["explain", str(photos), "--device", "gpu0", "--out", str(tmp_path / "o")]) == 2
    assert "auto, cpu, cuda, cuda:N or mps" in _error(capsys)


@pytest.mark.usefixtures("no_model")
def test_unknown_cmap_is_refused_before_anything_is_computed(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["explain", str(photos), "--cmap", "jett", "--out", str(tmp_path / "o")]) == 2
    assert "Did you mean jet" in _error(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("no_model")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--option", "gradcampp.alpha_normalize=yes2", "--method", "gradcampp"],
            "is a boolean option; received 'yes2'",
        ),
        (["--option", "gradcam.relu=maybe"], "is a boolean option"),
        (["--option", "gradcam.gamma=1"], "has no option 'gamma'"),
        (["--option", "gradcampp.relu=false"], "which --method does not request"),
        (["--option", "integrated_gradients.steps=2.5", "--method", "integrated_gradients"], "takes an integer"),
        (["--option", "smoothgrad.sigma=nan", "--method", "smoothgrad"], "finite number"),
        (["--option", "saliency.display=loud", "--method", "saliency"], "display must be one of"),
        (["--option", "gradcam"], "is not METHOD.KEY=VALUE"),
        (["--method", "gradcamm"], "Did you mean 'gradcam'"),
        (["--top-k", "0"], "--show-top (--top-k) must be"),
        (["--explain-top", "0"], "--explain-top must be at least 1"),
        (["--chunk-size", "0"], "--chunk-size must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--memory-budget-mb", "-5"], "Execution.memory_budget_mb must be a positive finite number"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--max-pixels", "0"], "--max-pixels must be at least 1"),
        (["--std", "0.5", "0", "0.5"], "--std values must be positive"),
        (["--mean", "nan"], "--mean values must be finite"),
    ],
)
def test_options_methods_and_ranges_are_checked_first(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(["explain", str(photos), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in _error(capsys)


def test_boolean_options_are_parsed_strictly() -> None:
    # before: "yes2" was accepted and behaved as true, "gradcam.relu=0" was stored as the int 0
    assert parse_options(["gradcam.relu=0"]) == {"gradcam": {"relu": False}}
    assert parse_options(["gradcam.relu=No"]) == {"gradcam": {"relu": False}}
    assert parse_options(["gradcampp.alpha_normalize=1"])["gradcampp"]["alpha_normalize"] is True
    for bad in ("yes2", "2", "", "truthy"):
        with pytest.raises(UsageError, match="boolean option"):
            parse_options([f"gradcampp.alpha_normalize={bad}"])
    typed = parse_options(
        [
            "integrated_gradients.steps=8",
            "integrated_gradients.baseline=0",
            "scorecam.top_k=none",
            "scorecam.relu=false",
        ]
    )
    assert typed == {
        "integrated_gradients": {"steps": 8, "baseline": 0.0},
        "scorecam": {"top_k": None, "relu": False},
    }
    assert isinstance(typed["integrated_gradients"]["baseline"], float)
    with pytest.raises(OptionError, match="its options are"):
        parse_options(["gradcam.alpha_normalize=true"])
    with pytest.raises(OptionError, match="its options are"):  # how to run is not a method option (Execution)
        parse_options(["scorecam.chunk_size=4"])


@pytest.mark.usefixtures("no_model")
def test_empty_folder_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    out = tmp_path / "o"
    assert cli.main(["explain", str(empty), "--out", str(out)]) == 1  # before: an empty index.html, exit 0
    err = capsys.readouterr().err
    assert "no image files" in err and "--recursive" in err and "expand_paths" not in err
    assert not out.exists()


def test_missing_weights_file_is_refused_before_loading(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    assert cli.main(["explain", str(photos), "--model", "resnet18", "--weights", str(tmp_path / "none.pt")]) == 2
    assert "no such file" in _error(capsys)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--input-size", "resnet18=big"], "--input-size resnet18=big: give a size in pixels, PX or HxW"),
        (["--input-size", "resnet18=64x64x3"], "give a size in pixels"),
        (["--input-size", "resnet50=64"], "'resnet50' is not one of --models (resnet18)"),
        (["--preprocess", "resnet18=caffe"], "applies to Keras models (keras:ARCH, .keras/.h5 files)"),
        (["--preprocess", "keras:vgg16=bgr"], "--preprocess keras:vgg16=bgr: the mode is one of caffe, tf, torch"),
        (["--preprocess", "caffe"], "--preprocess 'caffe' is not MODEL=VALUE"),
    ],
)
def test_compare_models_sizes_and_modes_are_checked_before_loading(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None, flags: list[str], message: str
) -> None:
    argv = ["compare-models", str(photos), "--models", "resnet18", "--random-weights", *flags]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_run_preprocess_is_for_keras_models(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None
) -> None:
    """``run --preprocess`` (shared with explain): a torch model is refused with the flag to use instead."""
    argv = ["run", str(dataset), "--model", "resnet18", "--random-weights", "--num-classes", "2"]
    assert cli.main([*argv, "--preprocess", "caffe", "--out", str(tmp_path / "run")]) == 2
    assert "set its normalisation with --mean/--std" in _error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--actors", "2"], "--actors apply to --engine ray: add --engine ray"),
        (["--address", "auto", "--storage", "file:///tmp/x"], "--address, --storage apply to --engine ray"),
        (["--gpus-per-actor", "1"], "--gpus-per-actor apply to --engine ray"),
        (["--engine", "ray", "--workers", "2"], "--workers 2 sets the local engine's decoding processes"),
    ],
)
def test_run_refuses_the_other_engines_flags_before_loading(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_model: None, flags: list[str], message: str
) -> None:
    """A flag of the engine not chosen would be ignored: ``run data --actors 4`` (no --engine ray) ran locally."""
    assert cli.main(["run", str(dataset), *flags, "--out", str(tmp_path / "run")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------------
# refused after loading, before computing
# --------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_compute")
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--show-top", "2000"], "must be between 1 and 1000 (the model has 1000 classes); received 2000"),
        (["--explain-top", "1001"], "--explain-top must be between 1 and 1000"),
        (["--class", "1500"], "out of range: the model has 1000 classes"),
        (["--layer", "bn3"], "did you mean"),
    ],
)
def test_model_dependent_ranges(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert cli.main(["explain", str(photos), "--out", str(tmp_path / "o"), *argv]) == 2
    assert message.lower() in _error(capsys).lower()
    assert not (tmp_path / "o").exists()


def test_text_file_as_checkpoint(photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "model.pth"
    text.write_text("not weights\n")
    argv = ["explain", str(photos), "--model", "resnet18", "--num-classes", "3", "--out", str(tmp_path / "o")]
    assert cli.main([*argv, "--weights", str(text)]) == 2  # before: a traceback ending in KeyError: 101
    assert "not a PyTorch checkpoint" in _error(capsys)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    assert cli.main([*argv, "--weights", str(empty)]) == 2  # before: "could not be read ...: ." (blank reason)
    assert "is empty (0 bytes)" in _error(capsys)


def test_large_photo_hint_names_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "wide.png"
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(image)
    out = tmp_path / "o"
    assert cli.main(["explain", str(image), "--max-pixels", "1000", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "pass a larger --max-pixels" in err and "pass a larger max_pixels" not in err
    assert cli.main(["explain", str(image), "--max-pixels", "2400", "--out", str(out)]) == 0


# --------------------------------------------------------------------------------------------------------
# NaN and inf
# --------------------------------------------------------------------------------------------------------


def _small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_explain_refuses_non_finite_inputs() -> None:
    x = torch.randn(3, 3, 12, 12)
    x[2, 1, 0, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"NaN or infinite values \(1 of 1296, in image\(s\) \[2\]\)"):
        cnnlens.explain(_small_net(), x)
    x[2, 1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        cnnlens.explain(_small_net(), x)


def test_explain_refuses_non_finite_scores_naming_the_weights() -> None:
    net = _small_net()
    with torch.no_grad():
        net[4].weight[1, 2] = float("nan")
    with pytest.raises(NonFiniteOutputError, match=r"1 parameter tensor\(s\) hold NaN/inf, e.g. 4.weight"):
        cnnlens.explain(net, torch.randn(2, 3, 12, 12))  # before: NaN probabilities, maps flagged "degenerate"


class _SqrtHead(nn.Module):
    """Finite scores, infinite gradients: d sqrt(a)/da at a = 0 is inf."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.fill_(-1.0)  # non-negative inputs -> all activations 0
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv(x))
        return a.sqrt().mean(dim=(2, 3))


def test_non_finite_maps_are_flagged_apart_from_constant_maps() -> None:
    result = cnnlens.explain(_SqrtHead().eval(), torch.rand(2, 3, 8, 8), layers=["act"])
    exp = result["gradcam", "act"]
    assert bool(exp.degenerate.all())
    assert bool(exp.extras["nonfinite"].all())  # before: only degenerate=True, same as a constant map
    assert torch.isfinite(exp.maps).all() and torch.isfinite(exp.raw).all()
    constant = cnnlens.explain(_small_net(), torch.zeros(1, 3, 12, 12), layers=["1"])["gradcam", "1"]
    assert "nonfinite" not in constant.extras


def test_cli_refuses_nan_weights_and_writes_no_nan(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torchvision

    net = torchvision.models.resnet18(num_classes=3)
    sd = net.state_dict()
    sd["fc.weight"][0, 0] = float("nan")
    ckpt = tmp_path / "nan.pt"
    torch.save(sd, ckpt)
    out = tmp_path / "o"
    code = cli.main(
        ["explain", str(photos), "--model", "resnet18", "--num-classes", "3", "--weights", str(ckpt), "--out", str(out)]
    )
    assert code == 2
    assert "fc.weight" in _error(capsys)

    def bare(constant: str) -> None:
        pytest.fail(f"bare {constant} in a JSON file")

    for manifest in out.rglob("*.json"):
        json.loads(manifest.read_text(), parse_constant=bare)


# --------------------------------------------------------------------------------------------------------
# models: preprocessing overrides, factories, listing without weights, one default layer
# --------------------------------------------------------------------------------------------------------


FACTORY = """
from torch import nn


def tiny(num_classes=4):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )
"""


def test_explain_a_factory_model_with_cifar_preprocessing(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "nets.py").write_text(FACTORY)
    torch.manual_seed(0)
    from importlib import util

    spec = util.spec_from_file_location("nets_for_test", tmp_path / "nets.py")
    assert spec is not None and spec.loader is not None
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = tmp_path / "tiny.pt"
    torch.save(module.tiny().state_dict(), ckpt)
    factory = f"{tmp_path / 'nets.py'}:tiny"
    common = ["--model", factory, "--weights", str(ckpt), "--input-size", "32", "--mean", "0.5", "--std", "0.25"]
    out = tmp_path / "o"
    assert cli.main(["explain", str(photos / "chelsea.png"), *common, "--out", str(out)]) == 0  # before: no such flags
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["results"][0]["layer"] == "3"  # the ReLU after the last conv: the shared default policy
    assert np.load(out / manifest["results"][0]["files"]["raw"]).shape == (32, 32)
    capsys.readouterr()
    assert cli.main(["layers", *common]) == 0
    assert "3x32x32" in capsys.readouterr().out


def test_execution_flags_reach_explain_and_leave_the_maps_alone(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from cnnlens.execution import Execution

    (tmp_path / "nets.py").write_text(FACTORY)
    seen: list[Any] = []
    module = importlib.import_module("cnnlens.explain")
    real = module.explain

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("execution"))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "explain", spy)
    common = [str(photos / "chelsea.png"), "--model", f"{tmp_path / 'nets.py'}:tiny", "--input-size", "32"]
    common += ["--method", "gradcam", "scorecam"]
    torch.manual_seed(0)  # the factory's weights
    assert cli.main(["explain", *common, "--out", str(tmp_path / "a")]) == 0
    flags = ["--threads", "1", "--chunk-size", "2", "--memory-budget-mb", "64"]
    torch.manual_seed(0)
    assert cli.main(["explain", *common, *flags, "--out", str(tmp_path / "b")]) == 0
    assert seen[0] == Execution()
    assert seen[-1] == Execution(threads=1, chunk_size=2, memory_budget_mb=64.0)
    docs = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("a", "b")]
    for first, second in zip(docs[0]["results"], docs[1]["results"], strict=True):
        assert first["variant"] == second["variant"]  # how to run is not part of a map's identity
        raw = [np.load(tmp_path / d / r["files"]["raw"]) for d, r in (("a", first), ("b", second))]
        np.testing.assert_array_equal(raw[0], raw[1])


def test_layers_lists_an_architecture_without_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["layers", "--model", "resnet50"]) == 0  # before: refused, no weights offline
    captured = capsys.readouterr()
    assert "layer4.2.conv3" in captured.out and "no weights for resnet50" in captured.err
    assert cli.main(["layers", "--model", "resnet18", "--num-classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "default target: layer4" in out  # the same layer as cnnlens.explain(net) picks


# --------------------------------------------------------------------------------------------------------
# what the user sees: escaped markup, no truncation, progress lines
# --------------------------------------------------------------------------------------------------------


def test_brackets_survive_and_80_columns_do_not_truncate(
    photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["methods"]) == 0
    assert "R_in = relu(R_out) * [x > 0]" in capsys.readouterr().out  # before: rich ate "[x > 0]"
    monkeypatch.setenv("COLUMNS", "80")
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "[x" in out and "…" not in out and max(len(line) for line in out.splitlines()) <= 80
    names = tmp_path / "classes.txt"
    names.write_text("cat [domestic]\ndog [wild]\nbird [x]\n")
    code = cli.main(
        ["explain", str(photos), "--model", "resnet18", "--num-classes", "3", "--random-weights",
         "--class-names", str(names), "--out", str(tmp_path / "o")]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "[domestic]" in out and "[wild]" in out and "…" not in out


def test_progress_is_one_line_per_phase_when_not_a_terminal(
    photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["explain", str(photos), "--method", "gradcam", "scorecam", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "explaining: started (2 to do)" in err  # one image x (the shared capture, Score-CAM alone)
    assert "explaining (scorecam): done 2/2 in" in err


def test_line_progress_counts_eta_and_done(capsys: pytest.CaptureFixture[str]) -> None:
    with LineProgress(sys.stderr, every=0.0) as bar:
        task = bar.add_task("phase", total=4)
        bar.advance(task, 1)
        bar.update(task, completed=4)
        bar.advance(task, 1)  # after done: ignored
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "phase: started (4 to do)"
    assert err[1].startswith("phase: 1/4 (25%)") and "ETA" in err[1]
    assert err[2].startswith("phase: done 4/4 in") and len(err) == 3


def test_layer_study_reports_measured_maps() -> None:
    from cnnlens.studies import compare_layers

    calls: list[tuple[int, int]] = []
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ).eval()  # fmt: skip
    compare_layers(
        net,
        torch.rand(1, 3, 16, 16),
        methods=["gradcam"],
        layers=["1", "3"],
        steps=4,
        progress=lambda d, t: calls.append((d, t)),
    )
    assert calls == [(0, 2), (1, 2), (2, 2)]  # before: no way to count, the CLI showed a spinner for minutes


def test_library_hints_are_rephrased_as_flags() -> None:
    assert cli._cli_hint("no candidate layer matched; pass layers=[...] explicitly") == (
        "no candidate layer matched; pass --layer NAME explicitly"
    )
    assert "--recursive" in cli._cli_hint("it has subdirectories: expand recursively to include them")
    assert "--max-pixels" in cli._cli_hint("Downscale the image, or pass a larger max_pixels if you trust the file.")


def test_json_files_never_hold_bare_nan(tmp_path: Path) -> None:
    from cnnlens.explanation import write_manifest
    from cnnlens.jsonfile import dumps_strict

    entry = {"method": "scorecam", "score": float("nan"), "extras": {"delta": [1.0, float("-inf")]}}
    path = write_manifest(tmp_path, [entry], {"command": "test"})

    def bare(constant: str) -> None:
        pytest.fail(f"bare {constant} in manifest.json")

    doc = json.loads(path.read_text(), parse_constant=bare)  # before: "score": NaN
    assert doc["results"][0]["score"] is None and doc["results"][0]["extras"]["delta"] == [1.0, None]
    assert dumps_strict((1.5, float("inf"))) == "[1.5, null]"


def test_top_k_is_a_deprecated_alias_of_show_top(capsys: pytest.CaptureFixture[str]) -> None:
    parser = cli._build_parser()
    old = parser.parse_args(["explain", "x.png", "--top-k", "3"])
    new = parser.parse_args(["explain", "x.png", "--show-top", "3"])
    assert old.show_top == new.show_top == 3
    assert getattr(old, "deprecated_top_k", False) and not getattr(new, "deprecated_top_k", False)
    with pytest.raises(SystemExit):
        cli.main(["explain", "--help"])
    assert "deprecated alias" in " ".join(capsys.readouterr().out.split())


def test_run_takes_max_pixels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for label in ("class_0", "class_1"):
        (tmp_path / "data" / label).mkdir(parents=True)
        Image.fromarray(np.full((40, 60, 3), 100, np.uint8)).save(tmp_path / "data" / label / "x.png")
    net = ["--model", "resnet18", "--num-classes", "2", "--random-weights", "--workers", "0", "--input-size", "32"]
    small = ["run", str(tmp_path / "data"), *net, "--max-pixels", "1000", "--no-average-drop"]
    assert cli.main([*small, "--out", str(tmp_path / "r1")]) == 1  # both images over the limit: error rows
    assert "--max-pixels" in capsys.readouterr().err
    assert cli.main([*small[:-3], "--max-pixels", "2400", "--out", str(tmp_path / "r2")]) == 0


def test_vit_default_layer_is_the_norm_before_the_last_attention_block() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3).eval()
    # before: silently patch_embed.proj (a meaningless map), then 'blocks.11' refused as not a feature map;
    # issue 11: blocks.11.norm1 read through its token layout (1 prefix token, 14x14 grid)
    result = cnnlens.explain(vit, torch.randn(1, 3, 224, 224))
    assert result.layers == ["blocks.11.norm1"]
    assert "tokens: 1 prefix token + 14x14 grid" in result.manifest["layouts"]["blocks.11.norm1"]
    assert cnnlens.explain(vit, torch.randn(1, 3, 224, 224), layers=["patch_embed.proj"]).layers == ["patch_embed.proj"]
