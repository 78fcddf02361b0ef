"""The Python API a new user meets: class names as targets, short reprs, indexing a result by method."""

from __future__ import annotations

import pytest
import torch
from tests.nets import GapHead, seeded

import cnnlens
from cnnlens.errors import CnnlensError, LayerNotFoundError, MethodNotFoundError, TargetError
from cnnlens.targets import ClassTarget, class_index, name_targets, resolve_targets

NAMES = ["tabby", "tiger cat", "Persian cat", "Egyptian cat", "tiger"]


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    return seeded(GapHead(classes=5), dtype=torch.float32)


def test_class_index_matches_names_case_insensitively() -> None:
    assert class_index("Tiger Cat", NAMES) == 1
    assert class_index("TIGER", NAMES) == 4  # exact before substring
    assert class_index("persian", NAMES) == 2  # a unique substring
    assert class_index(3, NAMES) == 3
    assert class_index("2", NAMES) == 2


def test_class_index_errors_say_what_and_how() -> None:
    with pytest.raises(TargetError, match=r"several classes: 1 'tiger cat', 2 'Persian cat', 3 'Egyptian cat'"):
        class_index("cat", NAMES)
    with pytest.raises(TargetError, match=r"no class named 'tabbby'.*Did you mean 0 'tabby'"):
        class_index("tabbby", NAMES)
    with pytest.raises(TargetError, match="out of range"):
        class_index(7, NAMES)
    with pytest.raises(TargetError, match=r"has no class names.*class_names="):
        class_index("tabby", None)


def test_resolve_targets_accepts_names_and_a_mix() -> None:
    assert resolve_targets("tiger cat", class_names=NAMES) == [ClassTarget(1)]
    assert resolve_targets(["tiger cat", 0], class_names=NAMES) == [ClassTarget((1, 0))]
    assert name_targets([2, 3], NAMES) == [2, 3]  # untouched without names
    with pytest.raises(TargetError, match="cannot mix class names with float"):
        name_targets(["tabby", 1.5], NAMES)
    with pytest.raises(TargetError, match="no class names"):
        resolve_targets(["tabby"], class_names=None)


def test_explain_with_class_name_targets(net: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    by_name = cnnlens.explain(net, x, targets=["Tiger Cat", "tabby"], class_names=NAMES)
    by_index = cnnlens.explain(net, x, targets=[1, 0], class_names=NAMES)
    assert by_name[0].target_classes.tolist() == [[1], [0]]
    torch.testing.assert_close(by_name[0].raw, by_index[0].raw)
    one = cnnlens.explain(net, x, targets="egyptian cat", class_names=NAMES)
    assert one[0].target_classes.tolist() == [[3], [3]]
    with pytest.raises(TargetError, match="no class names"):
        cnnlens.explain(net, x, targets=["tabby", "tabby"])


def test_explain_with_a_zoo_models_class_name() -> None:
    model = cnnlens.load_model("efficientnet_lite0")
    x = torch.zeros(1, 3, 224, 224)
    result = cnnlens.explain(model, x, targets=["tiger cat"])
    assert result[0].target_classes.tolist() == [[282]]
    assert model.class_names[282] == "tiger cat"


def test_reprs_are_short_and_informative(net: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = cnnlens.explain(net, x, methods=["gradcam", "gradcampp"], layers=["body.2", "body.4"], top_k=2)
    text = repr(result[0])
    assert len(text) < 300, text
    assert "tensor(" not in text
    for part in ("'gradcam'", "'body.2'", "(2, 2, 16, 16)", "images=2", "degenerate=", "'top class'"):
        assert part in text, (part, text)
    whole = repr(result)
    assert "tensor(" not in whole and len(whole) < 1000, whole
    assert "4 results" in whole and "gradcampp @ body.4" in whole and "degenerate maps" in whole


def test_index_a_result_by_method(net: torch.nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = cnnlens.explain(net, x, methods=["gradcam", "gradcampp"], layers=["body.4", "body.2"])
    gradcam = result["gradcam"]
    assert list(gradcam) == ["body.4", "body.2"]
    assert gradcam["body.2"] is result["gradcam", "body.2"]
    assert all(e.method == "gradcam" for e in gradcam.values())
    with pytest.raises(MethodNotFoundError, match=r"holds methods \['gradcam', 'gradcampp'\]"):
        result["scorecam"]
    with pytest.raises(LayerNotFoundError, match=r"computed at layers \['body.4', 'body.2'\]"):
        result["gradcam", "fc"]
    with pytest.raises(KeyError):  # still a KeyError for code that catches the builtin
        result["gradcam", "fc"]
    assert issubclass(MethodNotFoundError, CnnlensError)


def test_input_scope_methods_give_one_result_found_by_none_or_any_layer(net: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    result = cnnlens.explain(net, x, methods=["gradcam", "saliency"], layers=["body.4", "body.2"])
    assert [(e.method, e.layer) for e in result] == [
        ("gradcam", "body.4"),
        ("gradcam", "body.2"),
        ("saliency", "input"),
    ]
    one = result["saliency", None]
    assert one is result["saliency", "body.2"] is result["saliency", "input"] is result["saliency"]["input"]
    assert one.raw.shape == (2, 1, 16, 16)
    with pytest.raises(LayerNotFoundError, match="computed at layers"):
        result["gradcam", None]  # two layers: say which
    single = cnnlens.explain(net, x, methods=["gradcam"], layers=["body.4"])
    assert single["gradcam", None] is single["gradcam", "body.4"]
