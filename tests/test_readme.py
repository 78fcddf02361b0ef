"""The README's examples run: every ```python block is executed, every ``cnnlens`` shell command is parsed.

The Python blocks get a minimal prelude, the two names the README leaves to the reader: the current folder
is a temporary one holding ``cat.jpg`` (scikit-image's ``chelsea`` photo) and ``my_net`` is an untrained
``torchvision.models.resnet18()`` (it has ``layer3`` and ``layer4``). Nothing is downloaded.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from skimage import data

from cnnlens.cli import _build_parser

README = Path(__file__).parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        command = line.split(" #", 1)[0].strip()
        if command and not command.startswith("#"):
            out.append(command)
    return out


def test_the_readme_has_examples() -> None:
    assert len(_blocks("python")) >= 1
    assert sum(len(_commands(b)) for b in _blocks("sh")) >= 10


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_block_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _blocks("python")[index]
    monkeypatch.chdir(tmp_path)
    Image.fromarray(data.chelsea()).save(tmp_path / "cat.jpg")
    torch.manual_seed(0)
    namespace = {"__name__": "readme", "my_net": torchvision.models.resnet18(weights=None)}
    exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    if "result.save(" in code:
        assert (tmp_path / "out" / "manifest.json").is_file()


def test_readme_shell_commands_parse() -> None:
    parser = _build_parser()
    checked = 0
    for block in _blocks("sh"):
        for command in _commands(block):
            words = shlex.split(command)
            if words[0] != "cnnlens":
                assert words[0] == "make", command  # the quick start's make targets
                continue
            parser.parse_args(words[1:])  # argparse exits (SystemExit) on any unknown option or value
            checked += 1
    assert checked >= 10
