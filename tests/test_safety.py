"""No user file is ever deleted or silently overwritten (issue 9, section 2).

Each data-loss case of the issue is replayed through ``cnnlens.cli.main`` in a temporary folder. On the code
before the fix every one of them lost or overwrote a file with exit code 0; each test states what it lost.
Dataset runs use a tiny random-weight model from a factory file (no download, a fraction of a second per run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlens.cli import main
from cnnlens.data import expand_paths
from cnnlens.explanation import ExplanationSet
from cnnlens.outputs_dir import MARKER, OutputFolderError, claim_output_dir, read_marker, safe_name, unique_names

NET = """
from torch import nn


def build(num_classes=2):
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes)
    )
"""


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _png(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def net(tmp_path: Path) -> list[str]:
    """Model arguments for `cnnlens run` and `cnnlens explain`: a tiny seeded random model, 16x16 inputs."""
    (tmp_path / "tiny_net.py").write_text(NET)
    (tmp_path / "classes.txt").write_text("tabby\ntiger\n")
    namespace: dict[str, object] = {}
    exec(NET, namespace)
    torch.manual_seed(0)
    torch.save(namespace["build"]().state_dict(), tmp_path / "tiny.pt")  # type: ignore[operator]
    return [
        "--model", f"{tmp_path / 'tiny_net.py'}:build", "--weights", str(tmp_path / "tiny.pt"),
        "--class-names", str(tmp_path / "classes.txt"), "--input-size", "16", "--mean", "0.5", "--std", "0.5",
    ]  # fmt: skip


def _dataset(root: Path) -> Path:
    for i, name in enumerate(("tabby", "tiger")):
        _png(root / name / "a.png", i)
        _png(root / name / "b.png", i + 10)
    return root


def _run(dataset: Path, out: Path, net: list[str], *extra: str) -> int:
    return main(["run", str(dataset), "--out", str(out), *net, "--workers", "0", "--batch-size", "4", *extra])


# -- cnnlens report --out ------------------------------------------------------------------------------------
def test_report_never_deletes_a_folder_that_has_a_report_json(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: exit 0 and budget.xlsx and sub/ were gone (any folder with a report.json was rmtree'd)."""
    run = tmp_path / "run"
    assert _run(_dataset(tmp_path / "ds"), run, net) == 0
    u = tmp_path / "u"
    (u / "sub").mkdir(parents=True)
    (u / "report.json").write_text("{}")
    (u / "budget.xlsx").write_text("x")
    (u / "sub" / "photo.jpg").write_text("x")
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(u)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "budget.xlsx" in err
    assert (u / "budget.xlsx").read_text() == "x" and (u / "sub" / "photo.jpg").read_text() == "x"
    assert (u / "report.json").read_text() == "{}"
    # --overwrite writes into it: the same-named report.json is replaced, nothing else is touched.
    assert main(["report", str(run), "--out", str(u), "--overwrite"]) == 0
    assert (u / "budget.xlsx").read_text() == "x" and (u / "sub" / "photo.jpg").read_text() == "x"
    assert json.loads((u / "report.json").read_text())["total"] == 4
    # A second report replaces exactly the files the first one listed, keeping the user's.
    assert main(["report", str(run), "--out", str(u)]) == 0
    assert (u / "budget.xlsx").exists() and (u / "sub" / "photo.jpg").exists() and (u / "index.html").exists()
    marker = read_marker(u)
    assert marker is not None and marker["kind"] == "report"
    assert "index.html" in marker["files"] and "budget.xlsx" not in marker["files"]


def test_report_prints_accuracy_and_counts(tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Before: `cnnlens report` printed only the path of index.html."""
    run = tmp_path / "run"
    assert _run(_dataset(tmp_path / "ds"), run, net) == 0
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    data = json.loads((run / "report" / "report.json").read_text())
    shown = "-" if data["accuracy"] is None else f"{100 * data['accuracy']:.2f} %"
    assert f"accuracy {shown}" in out and f"{data['correct']} of {data['ok']}" in out and "4 image(s)" in out


def test_report_draws_class_names_as_plain_text(tmp_path: Path, net: list[str]) -> None:
    r"""Before: a class name that is invalid math text (``$\frac{a}{$``) crashed the confusion-matrix drawing."""
    (tmp_path / "classes.txt").write_text("$\\frac{a}{$\n$x$ & co\n")
    ds = tmp_path / "ds"
    _png(ds / "0" / "a.png", 1)
    _png(ds / "1" / "a.png", 2)
    run = tmp_path / "run"
    assert _run(ds, run, net) == 0
    assert main(["report", str(run)]) == 0
    assert (run / "report" / "confusion.png").stat().st_size > 0


# -- cnnlens run --out -----------------------------------------------------------------------------------------
def test_run_refuses_a_folder_it_did_not_write_and_overwrite_deletes_nothing_foreign(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: exit 0 and D/maps/city.geojson and D/report/thesis.docx were deleted (store.remove_owned)."""
    ds = _dataset(tmp_path / "ds")
    d = tmp_path / "D"
    (d / "maps").mkdir(parents=True)
    (d / "report").mkdir()
    (d / "maps" / "city.geojson").write_text("x")
    (d / "report" / "thesis.docx").write_text("x")
    assert _run(ds, d, net) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (d / "maps" / "city.geojson").exists() and (d / "report" / "thesis.docx").exists()
    assert sorted(p.name for p in d.iterdir()) == ["maps", "report"]  # not even a lock file left behind
    assert _run(ds, d, net, "--overwrite") == 0
    assert (d / "maps" / "city.geojson").exists() and (d / "report" / "thesis.docx").exists()
    assert (d / "results.parquet").exists()
    # Starting over in the run cnnlens now owns removes its own files only.
    assert _run(ds, d, net, "--overwrite", "--method", "gradcampp") == 0
    assert (d / "maps" / "city.geojson").exists() and (d / "report" / "thesis.docx").exists()
    assert not list((d / "maps").glob("gradcam@*")) and list((d / "maps").glob("gradcampp@*"))


def test_run_overwrite_removes_its_report_files_but_not_the_users(tmp_path: Path, net: list[str]) -> None:
    ds = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    assert _run(ds, run, net) == 0
    assert main(["report", str(run)]) == 0
    (run / "report" / "my notes.txt").write_text("mine")
    (run / "notes.txt").write_text("mine too")
    assert _run(ds, run, net, "--overwrite", "--method", "gradcampp") == 0
    assert (run / "report" / "my notes.txt").read_text() == "mine" and (run / "notes.txt").exists()
    assert not (run / "report" / "index.html").exists()  # the stale report's files went, the folder stays


def test_run_output_inside_the_dataset_is_not_read_back(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `run ds --out ds/tabby/run` counted its own overlays as images of class tabby on the next run."""
    ds = _dataset(tmp_path / "ds")
    out = ds / "tabby" / "run"
    assert _run(ds, out, net, "--overlay-format", "png") == 0
    assert list(out.rglob("overlays/*/*.png"))
    other = ds / "tabby" / "run2"
    capsys.readouterr()
    assert _run(ds, other, net) == 0
    assert "cnnlens output folder" in capsys.readouterr().err
    summary = json.loads((other / "summary.json").read_text())
    assert summary["total"] == 4
    assert _run(ds, out, net, "--overlay-format", "png") == 0  # the same run again: same dataset, resumes


def test_run_prints_percentages_in_one_labelled_unit(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: `average_drop_pct 0.273` (a fraction-looking number under a percent name)."""
    assert _run(_dataset(tmp_path / "ds"), tmp_path / "run", net) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (metrics,) = summary["metrics"].values()
    assert f"Average Drop {metrics['average_drop_pct']:.1f} %" in out
    assert "average_drop_pct" not in out


# -- cnnlens explain --out -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "files",
    [("cat.png", "cat.jpg"), ("a b.jpg", "a_b.jpg"), ("猫.jpg", "犬.jpg"), ("Cat.png", "cat.png")],
    ids=["suffix", "space", "unicode", "case"],
)
def test_explain_gives_every_image_its_own_files(tmp_path: Path, net: list[str], files: tuple[str, str]) -> None:
    """Before: both images were written to one folder (cat / a_b / x), the second's maps over the first's."""
    src = tmp_path / "in"
    for i, name in enumerate(files):
        _png(src / name, i)
    if len({f.casefold() for f in files}) < len(files) and len(list(src.iterdir())) < len(files):
        pytest.skip("case-insensitive file system")
    out = tmp_path / "out"
    assert main(["explain", str(src), "--out", str(out), *net, "--method", "gradcam"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    overlays = [r["files"]["overlay"] for r in manifest["results"]]
    assert len(overlays) == 2 and len({o.casefold().split("/")[0] for o in overlays}) == 2
    sources = {i["name"]: Path(i["source"]).name for i in manifest["images"]}
    assert sorted(sources.values()) == sorted(files)
    for r in manifest["results"]:
        assert (out / r["files"]["overlay"]).is_file() and r["files"]["overlay"].startswith(r["image"] + "/")
    if files[0] == "猫.jpg":
        assert set(sources) == {"猫", "犬"}  # unicode kept, readable
    if files[0] == "a b.jpg":
        assert set(sources) == {"a b", "a_b"}


def test_explain_refuses_a_foreign_folder(tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Before: exit 0, the user's manifest.json and index.html silently replaced."""
    _png(tmp_path / "in" / "one.png", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": 1}')
    (out / "index.html").write_text("<p>mine</p>")
    assert main(["explain", str(tmp_path / "in"), "--out", str(out), *net]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "manifest.json").read_text() == '{"mine": 1}' and (out / "index.html").read_text() == "<p>mine</p>"
    (out / "notes.txt").write_text("keep")
    assert main(["explain", str(tmp_path / "in"), "--out", str(out), *net, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["command"] == "explain"
    assert (out / "notes.txt").read_text() == "keep"


def test_second_explain_into_the_same_folder_merges_the_index(tmp_path: Path, net: list[str]) -> None:
    """Before: the second explain's index dropped the first one's images while their files stayed."""
    _png(tmp_path / "e1" / "one.png", 1)
    _png(tmp_path / "e2" / "two.png", 2)
    _png(tmp_path / "e2" / "sub" / "one.png", 3)  # another image with the first one's name
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "e1"), "--out", str(out), *net, "--method", "gradcam"]) == 0
    assert main(["explain", str(tmp_path / "e2"), "--recursive", "--out", str(out), *net, "--method", "gradcam"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    names = {r["image"] for r in manifest["results"]}
    assert len(names) == 3 and "one" in names and "two" in names
    html = (out / "index.html").read_text()
    assert all(f"<h2>{n}</h2>" in html for n in names)
    sources = {i["name"]: i["source"] for i in manifest["images"]}
    assert sources["one"] == str((tmp_path / "e1" / "one.png").resolve())
    # The same image explained again replaces its entries (and removes its own files it did not rewrite).
    assert main(["explain", str(tmp_path / "e1"), "--out", str(out), *net, "--method", "gradcampp"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    ones = [r for r in manifest["results"] if r["image"] == "one"]
    assert [r["method"] for r in ones] == ["gradcampp"] and not list((out / "one").glob("gradcam__*"))
    assert len({r["image"] for r in manifest["results"]}) == 3


def test_explain_with_another_model_into_an_explain_folder_is_refused(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    _png(tmp_path / "in" / "one.png", 1)
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "in"), "--out", str(out), *net]) == 0
    (tmp_path / "tiny_net2.py").write_text(NET)
    other = list(net)
    other[other.index("--model") + 1] = f"{tmp_path / 'tiny_net2.py'}:build"
    before = (out / "manifest.json").read_text()
    capsys.readouterr()
    assert main(["explain", str(tmp_path / "in"), "--out", str(out), *other]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "cannot mix" in err
    assert (out / "manifest.json").read_text() == before
    assert main(["explain", str(tmp_path / "in"), "--out", str(out), *other, "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["model"]["name"] != json.loads(before)["model"]["name"]


def test_explain_output_inside_the_inputs_is_not_read_back(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: the second `explain in --recursive --out in/out` explained 6 images (its own overlays) instead of 2."""
    src = tmp_path / "in"
    _png(src / "x.png", 1)
    _png(src / "s" / "y.png", 2)
    for _ in range(2):
        assert main(["explain", str(src), "--recursive", "--out", str(src / "out"), *net, "--method", "gradcam"]) == 0
    manifest = json.loads((src / "out" / "manifest.json").read_text())
    assert len(manifest["predictions"]) == 2
    # Output written into the input folder itself (it holds the user's images: --overwrite to write there), then
    # again: its own files are not inputs either.
    for extra in (["--overwrite"], []):
        assert main(["explain", str(src), "--recursive", "--out", str(src), *net, "--method", "gradcam", *extra]) == 0
    manifest = json.loads((src / "manifest.json").read_text())
    assert sorted(Path(i["source"]).name for i in manifest["images"]) == ["x.png", "y.png"]


def test_explanation_set_save_writes_the_cli_index(tmp_path: Path) -> None:
    """Before: ExplanationSet.save wrote no index.html (only the CLI did)."""
    from cnnlens.explain import explain

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))  # fmt: skip
    torch.manual_seed(0)
    result = explain(model, torch.rand(2, 3, 16, 16), methods=["gradcam"], layers=["1"], image_names=["a", "a"])
    assert isinstance(result, ExplanationSet)
    written = result.save(tmp_path / "out")
    index = tmp_path / "out" / "index.html"
    assert written[-1] == index and index.is_file()
    html = index.read_text()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    folders = {r["files"]["overlay"].split("/")[0] for r in manifest["results"]}
    assert len(folders) == 2  # two images named "a" keep their own files
    for r in manifest["results"]:
        assert r["files"]["overlay"] in html
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text("{}")
    with pytest.raises(OutputFolderError, match="overwrite"):
        result.save(foreign)
    assert (foreign / "manifest.json").read_text() == "{}"


# -- listing inputs ---------------------------------------------------------------------------------------------
def test_symlink_loops_and_other_files_are_skipped_with_a_note(tmp_path: Path) -> None:
    """Before: a symlink loop made the whole folder fail ("cannot list the directory"); SVGs went unmentioned."""
    folder = tmp_path / "pics"
    _png(folder / "ok.png", 1)
    _png(folder / "sub" / "deep.png", 2)
    (folder / "drawing.svg").write_text("<svg/>")
    try:
        os.symlink("loop.jpg", folder / "loop.jpg")
        os.symlink("..", folder / "sub" / "up")
    except OSError:  # pragma: no cover - no symlinks here
        pytest.skip("symbolic links not available")
    for recursive, expected in ((False, ["ok.png"]), (True, ["ok.png", "deep.png"])):
        notes: list[str] = []
        paths, failures = expand_paths([folder], recursive=recursive, notes=notes)
        assert [p.name for p in paths] == expected and not failures
        text = "\n".join(notes)
        assert "symbolic link loop" in text and "loop.jpg" in text
        assert "not images" in text and "drawing.svg" in text
        assert ("not followed" in text) == recursive


def test_explain_notes_skipped_entries(tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "pics"
    _png(folder / "ok.png", 1)
    (folder / "drawing.svg").write_text("<svg/>")
    try:
        os.symlink("loop", folder / "loop")
    except OSError:  # pragma: no cover
        pytest.skip("symbolic links not available")
    assert main(["explain", str(folder), "--out", str(tmp_path / "out"), *net, "--method", "gradcam"]) == 0
    err = capsys.readouterr().err
    assert "symbolic link loop" in err and "drawing.svg" in err


def test_run_tree_notes_skipped_entries(tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    ds = _dataset(tmp_path / "ds")
    (ds / "tabby" / "vector.svg").write_text("<svg/>")
    try:
        os.symlink("self", ds / "tiger" / "self")
    except OSError:  # pragma: no cover
        pytest.skip("symbolic links not available")
    assert _run(ds, tmp_path / "run", net) == 0
    err = capsys.readouterr().err
    assert "vector.svg" in err and "symbolic link loop" in err


# -- the helper ------------------------------------------------------------------------------------------------------
def test_owned_folder_removes_only_listed_files(tmp_path: Path) -> None:
    folder = claim_output_dir(tmp_path / "o", "explain")
    (tmp_path / "o" / "a").mkdir()
    (tmp_path / "o" / "a" / "mine.png").write_text("x")
    (tmp_path / "o" / "a" / "user.txt").write_text("u")
    (tmp_path / "o" / "b").mkdir()
    (tmp_path / "o" / "b" / "mine.png").write_text("x")
    folder.record(["a/mine.png", tmp_path / "o" / "b" / "mine.png"])
    folder.save()
    again = claim_output_dir(tmp_path / "o", "explain")
    assert again.reused and again.files == {"a/mine.png", "b/mine.png"}
    assert sorted(again.remove_listed()) == ["a/mine.png", "b/mine.png"]
    assert (tmp_path / "o" / "a" / "user.txt").exists() and not (tmp_path / "o" / "b").exists()
    assert (tmp_path / "o" / MARKER).is_file()
    with pytest.raises(OutputFolderError, match="not 'report'"):
        claim_output_dir(tmp_path / "o", "report")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputFolderError, match="is a file"):
        claim_output_dir(tmp_path / "file", "explain", overwrite=True)
    assert isinstance(OutputFolderError("x"), FileExistsError)


def test_names_are_unique_readable_and_stable() -> None:
    assert safe_name("猫.jpg") == "猫.jpg" and safe_name("../../etc/passwd") == "etc_passwd"
    assert unique_names(["a/cat.png", "b/cat.jpg", "dog.png"]) == ["cat_png", "cat_jpg", "dog"]
    assert unique_names(["猫.jpg", "犬.jpg"]) == ["猫", "犬"]
    twice = unique_names(["x/a b.png", "y/a b.png"])
    assert len({n.casefold() for n in twice}) == 2 and twice == unique_names(["x/a b.png", "y/a b.png"])
    assert all(n.startswith("a b_png-") for n in twice)
    taken = {"one": os.path.abspath("elsewhere/one.png")}
    assert unique_names(["here/one.png"], taken=taken) == ["one_png"]
    assert unique_names(["elsewhere/one.png"], taken=taken) == ["one"]


def test_compare_layers_refuses_a_foreign_folder_and_lists_what_it_wrote(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: compare-layers wrote its index.html over the user's, exit 0."""
    _png(tmp_path / "in" / "one.png", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("<p>mine</p>")
    (out / "notes.txt").write_text("keep")
    args = ["compare-layers", str(tmp_path / "in"), "--out", str(out), *net, "--method", "gradcam", "--steps", "2"]
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "index.html").read_text() == "<p>mine</p>"
    assert main([*args, "--overwrite"]) == 0
    marker = read_marker(out)
    assert marker is not None and marker["kind"] == "compare-layers"
    assert "index.html" in marker["files"] and "notes.txt" not in marker["files"]
    assert (out / "notes.txt").read_text() == "keep"
    assert main(args) == 0  # its own folder: reused


def test_run_folder_of_an_older_cnnlens_resumes_and_keeps_user_files(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """A run folder written before markers existed (run.json, no marker) is still a run: resumed, not refused."""
    ds = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    assert _run(ds, run, net) == 0
    (run / MARKER).unlink()
    (run / "maps" / "city.geojson").write_text("x")
    capsys.readouterr()
    assert _run(ds, run, net) == 0
    assert "already done" in capsys.readouterr().err and read_marker(run) is not None
    (run / MARKER).unlink()
    assert _run(ds, run, net, "--overwrite", "--method", "gradcampp") == 0
    assert (run / "maps" / "city.geojson").read_text() == "x" and not list((run / "maps").glob("gradcam@*"))


def test_report_written_into_a_run_folder_then_run_overwrite_starts_clean(tmp_path: Path, net: list[str]) -> None:
    ds = _dataset(tmp_path / "ds")
    run = tmp_path / "run"
    assert _run(ds, run, net) == 0
    assert main(["report", str(run), "--out", str(run)]) == 2  # a run folder is not a report folder
    assert main(["report", str(run), "--out", str(run), "--overwrite"]) == 0
    assert _run(ds, run, net) == 2  # now marked as a report: refused without --overwrite
    assert _run(ds, run, net, "--overwrite", "--method", "gradcampp") == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total"] == 4 and summary["skipped"] == 0
    assert [k.split("/")[0] for k in summary["metrics"]] == ["gradcampp"]


def test_a_report_of_an_older_cnnlens_is_rewritten_in_place(tmp_path: Path, net: list[str]) -> None:
    run = tmp_path / "run"
    assert _run(_dataset(tmp_path / "ds"), run, net) == 0
    assert main(["report", str(run)]) == 0
    (run / "report" / MARKER).unlink()  # as an older cnnlens left it
    assert main(["report", str(run)]) == 0
    assert read_marker(run / "report") is not None
    # ...but only when it holds nothing else: a report.json beside other files proves nothing.
    (run / "report" / MARKER).unlink()
    (run / "report" / "thesis.docx").write_text("x")
    assert main(["report", str(run)]) == 2
    assert (run / "report" / "thesis.docx").exists() and (run / "report" / "index.html").exists()


def test_an_explain_folder_of_an_older_cnnlens_is_merged(tmp_path: Path, net: list[str]) -> None:
    _png(tmp_path / "e1" / "one.png", 1)
    _png(tmp_path / "e2" / "two.png", 2)
    out = tmp_path / "out"
    assert main(["explain", str(tmp_path / "e1"), "--out", str(out), *net, "--method", "gradcam"]) == 0
    (out / MARKER).unlink()  # as an older cnnlens left it: its manifest lists every file it wrote
    assert main(["explain", str(tmp_path / "e2"), "--out", str(out), *net, "--method", "gradcam"]) == 0
    assert {r["image"] for r in json.loads((out / "manifest.json").read_text())["results"]} == {"one", "two"}
    (out / MARKER).unlink()
    (out / "one" / "thesis.docx").write_text("x")  # a file its manifest does not list: no proof any more
    assert main(["explain", str(tmp_path / "e2"), "--out", str(out), *net, "--method", "gradcam"]) == 2
    assert (out / "one" / "thesis.docx").exists()


def test_a_class_folder_that_holds_explanations_stays_a_class(
    tmp_path: Path, net: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    ds = _dataset(tmp_path / "ds")
    tabby = ds / "tabby"
    assert main(["explain", str(tabby), "--out", str(tabby), *net, "--method", "gradcam", "--overwrite"]) == 0
    assert (tabby / MARKER).is_file()
    assert _run(ds, tmp_path / "run", net) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["total"] == 4  # tabby's two photos, not its overlays and heatmaps


def test_a_command_that_writes_nothing_leaves_no_folder(tmp_path: Path, net: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    out = tmp_path / "never"
    assert main(["compare-layers", str(tmp_path / "empty"), "--out", str(out), *net]) == 1
    assert not out.exists()
