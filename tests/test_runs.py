"""Dataset runs and error analysis (``cnnlens run`` / ``cnnlens report``), offline and fast.

A tiny CNN is trained inside the tests (seconds) on synthetic 32x32 images whose class is a small glyph at a
random position; two classes differ only by a faint detail, so they are confusable on purpose. The run must
localise the glyph (pointing game on held-out images), report the confusable pair, survive SIGKILL and
restarts, turn bad files into error rows, refuse a changed configuration and load the model from a factory.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from cnnlens.cli import handler
from cnnlens.cli.parser_more import add_run_commands
from cnnlens.errors import ModelConfigError, ModelNotFoundError
from cnnlens.explain import explain
from cnnlens.models import Preprocessing
from cnnlens.outputs_dir import MARKER, OutputFolderError
from cnnlens.report import render_run_report
from cnnlens.runs import (
    DatasetError,
    RunSettings,
    collate,
    decode_sample,
    is_entry_point,
    load_run_model,
    open_results,
    process_batch,
    read_dataset,
    run_dataset,
)
from cnnlens.runs.__main__ import main as runs_main
from cnnlens.runs.decode import box_to_input

NAMES = ("plus", "ring", "ell", "ell_dot")
ELL = [(r, 0) for r in range(6)] + [(5, c) for c in range(6)]
GLYPHS = {
    "plus": [(2, c) for c in range(6)]
    + [(3, c) for c in range(6)]
    + [(r, 2) for r in range(6)]
    + [(r, 3) for r in range(6)],
    "ring": [(0, c) for c in range(6)]
    + [(5, c) for c in range(6)]
    + [(r, 0) for r in range(6)]
    + [(r, 5) for r in range(6)],
    "ell": ELL,
    "ell_dot": [*ELL, (1, 3), (2, 3), (1, 4), (2, 4)],  # the extra dot is faint, often lost in the noise
}

NET_SOURCE = '''
"""The planted-evidence CNN: stride-1 convolutions, global average pooling, a linear head."""
import os
import time

from torch import nn


class Planted(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        delay = float(os.environ.get("PLANTED_DELAY", "0"))
        if delay:  # makes a subprocess slow enough to be killed mid-run
            time.sleep(delay)
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(num_classes=4):
    return Planted(num_classes)


def build_fixed():
    return Planted(4)


def not_a_model():
    return 42
'''


def make_images(n_per_class: int, seed: int) -> tuple[np.ndarray, list[int], list[tuple[int, int, int, int]]]:
    """Noise background, one bright 6x6 glyph per image at a random position; the glyph is the class."""
    rng = np.random.default_rng(seed)
    images, labels, boxes = [], [], []
    for c, name in enumerate(NAMES):
        for _ in range(n_per_class):
            img = rng.integers(0, 90, (32, 32, 3)).astype(np.uint8)
            y, x = (int(v) for v in rng.integers(0, 27, 2))
            bright, faint = int(rng.integers(170, 256)), int(rng.integers(40, 200))
            for r, col in GLYPHS[name]:
                img[y + r, x + col] = bright if (r, col) in ELL or name != "ell_dot" else faint
            images.append(img)
            labels.append(c)
            boxes.append((x, y, x + 6, y + 6))
    return np.stack(images), labels, boxes


def import_file(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"planted_{abs(hash(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(module: Any, weights: Path) -> None:
    images, labels, _ = make_images(120, seed=0)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    y = torch.tensor(labels)
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(0)
        net = module.build()
        opt = torch.optim.Adam(net.parameters(), 1e-2)
        for _ in range(14):  # robust across seeds: pointing >= 0.95, the easy classes 100 %
            perm = torch.randperm(len(x))
            for i in range(0, len(x), 32):
                idx = perm[i : i + 32]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    torch.save(net.state_dict(), weights)


def write_dataset(folder: Path, n_per_class: int, seed: int, bad: bool) -> Path:
    """PNG files plus ``labels.csv`` (path,label,x0,y0,x1,y1; label names); ``bad`` adds unreadable files."""
    images, labels, boxes = make_images(n_per_class, seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["path,label,x0,y0,x1,y1"]
    for i, (img, label, box) in enumerate(zip(images, labels, boxes, strict=True)):
        Image.fromarray(img).save(folder / f"img{i:04d}.png")
        lines.append(f"img{i:04d}.png,{NAMES[label]},{box[0]},{box[1]},{box[2]},{box[3]}")
    if bad:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
        (folder / "empty.png").write_bytes(b"")
        lines += ["broken.png,plus,,,,", "empty.png,ring,0,0,4,4", "missing.png,ell,,,,"]
    table = folder / "labels.csv"
    table.write_text("\n".join(lines) + "\n")
    return table


@dataclass
class Planted:
    root: Path
    net_file: Path
    weights: Path
    classes: Path
    table: Path
    small: Path

    def args(self, table: Path, out: Path, *extra: str, workers: str = "1") -> list[str]:
        return [
            "run", str(table), "--model", f"{self.net_file}:build", "--weights", str(self.weights),
            "--input-size", "32", "--mean", "0.5", "--std", "0.5", "--class-names", str(self.classes),
            "--out", str(out), "--batch-size", "8", "--shard-size", "16", "--workers", workers, *extra,
        ]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """One torch thread: these tiny models run several times faster without thread hand-offs on a busy machine."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    root = tmp_path_factory.mktemp("planted")
    net_file = root / "planted_net.py"
    net_file.write_text(NET_SOURCE)
    weights = root / "planted.pt"
    train(import_file(net_file), weights)
    classes = root / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    table = write_dataset(root / "heldout", 20, seed=1, bad=True)
    small = write_dataset(root / "small", 6, seed=2, bad=False)
    return Planted(root, net_file, weights, classes, table, small)


@pytest.fixture(scope="module")
def planted_run(planted: Planted) -> tuple[Path, int, str, str]:
    """The main run over the held-out set (with bad files), via the CLI, then its report."""
    out = planted.root / "run"
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = runs_main(planted.args(planted.table, out))
        assert runs_main(["report", str(out)]) == 0
    return out, code, stdout.getvalue(), stderr.getvalue()


# -- planted evidence ---------------------------------------------------------------------------------
def test_planted_evidence_gradcam_points_at_the_glyph(planted_run: tuple[Path, int, str, str]) -> None:
    out, _, _, _ = planted_run
    rows = pq.read_table(out / "results.parquet").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 80
    layer = json.loads((out / "run.json").read_text())["pairs"][0]["layer"]
    assert layer == "features"  # the default: the block ending with the last conv's ReLU
    hits = [r[f"gradcam/{layer}/pointing_pred"] for r in ok]
    assert all(h is not None for h in hits)
    assert sum(hits) / len(hits) >= 0.9
    energy = [r[f"gradcam/{layer}/energy_in_box_pred"] for r in ok]
    assert all(0.0 <= e <= 1.0 for e in energy) and np.mean(energy) > 36 / 1024  # well above a uniform map's share
    accuracy = sum(r["correct"] for r in ok) / len(ok)
    assert accuracy >= 0.6


def test_confusable_pair_tops_the_report(planted_run: tuple[Path, int, str, str]) -> None:
    out, _, _, _ = planted_run
    report = json.loads((out / "report" / "report.json").read_text())
    top = report["confused_pairs"][0]
    assert {top["true_name"], top["predicted_name"]} == {"ell", "ell_dot"}
    html = (out / "report" / "index.html").read_text()
    table = html.split('id="confused-pairs"', 1)[1].split("</table>", 1)[0]
    first = table.split("<tr>")[2]
    assert "ell" in first and "ell_dot" in first
    easy = {c["name"]: c["accuracy"] for c in report["per_class"]}
    assert easy["plus"] >= 0.9 and easy["ring"] >= 0.9
    assert report["box_energy"] and report["box_energy"][0]["energy_correct"] is not None


def test_bad_files_become_error_rows(planted_run: tuple[Path, int, str, str]) -> None:
    out, code, stdout, stderr = planted_run
    assert code == 1  # the run finished; some inputs failed
    rows = pq.read_table(out / "results.parquet").to_pylist()
    errors = {Path(r["path"]).name: r["error"] for r in rows if r["status"] == "error"}
    assert set(errors) == {"broken.png", "empty.png", "missing.png"}
    assert "empty" in errors["empty.png"] and "no such file" in errors["missing.png"]
    for r in rows:
        if r["status"] == "error":
            assert r["prediction"] is None and r["correct"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["errors"] == 3 and summary["ok"] == 80 and summary["total"] == 83
    assert summary["images_per_s"] > 0 and summary["accuracy"] is not None
    assert "83/83" in stderr and "broken.png" in stderr  # progress (plain lines: stderr is not a terminal here)
    assert "accuracy" in stdout and "images/s" in stdout


def test_results_read_back_with_pyarrow(planted_run: tuple[Path, int, str, str], planted: Planted) -> None:
    out, _, _, _ = planted_run
    table = pq.read_table(out / "results.parquet")
    assert table.num_rows == 83 and table.column("index").to_pylist() == list(range(83))
    paths = table.column("path").to_pylist()
    assert len(set(paths)) == len(paths)
    for name in table.column_names:  # never NaN
        col = table.column(name)
        if pa.types.is_floating(col.type):
            values = [v for v in col.to_pylist() if v is not None]
            assert all(np.isfinite(values)), name
    res = open_results(out)
    rows = res.table.to_pylist()
    wrong = next(r for r in rows if r["status"] == "ok" and not r["correct"])
    right = next(r for r in rows if r["status"] == "ok" and r["correct"])
    assert wrong["gradcam/features/avg_drop_true"] is not None and right["gradcam/features/avg_drop_true"] is None
    assert wrong["gradcam/features/overlay_true"] and (out / wrong["gradcam/features/overlay_true"]).is_file()
    assert (out / wrong["image_file"]).is_file() and right["image_file"] is None
    # The stored maps give back exactly what explain() computes on the same input.
    model = load_run_model(f"{planted.net_file}:build", weights=planted.weights, input_size=[32], mean=[0.5], std=[0.5])
    x = model.spec.preprocessing.to_tensor(np.array(Image.open(wrong["path"]).convert("RGB")))[None]
    direct = explain(model, x, layers=["features"], targets=torch.tensor([[wrong["prediction"], wrong["label"]]]))
    pred_map, true_map = res.maps(wrong["index"])
    assert pred_map is not None and true_map is not None and pred_map.shape == (32, 32)
    np.testing.assert_allclose(pred_map, direct[0].maps[0, 0].numpy(), atol=1e-4)
    np.testing.assert_allclose(true_map, direct[0].maps[0, 1].numpy(), atol=1e-4)
    assert res.maps(right["index"])[1] is None
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["columns"]) == set(table.column_names)


def test_results_read_back_with_pandas(planted_run: tuple[Path, int, str, str]) -> None:
    pd = pytest.importorskip("pandas")
    out, _, _, _ = planted_run
    frame = pd.read_parquet(out / "results.parquet")
    assert len(frame) == 83 and frame["path"].is_unique


def test_report_links_only_files_that_exist(planted_run: tuple[Path, int, str, str], tmp_path: Path) -> None:
    out, _, _, _ = planted_run

    def links(folder: Path) -> list[str]:
        html = (folder / "index.html").read_text()
        found = re.findall(r'(?:src|href)="([^"#:]+)"', html)
        assert found
        for rel in found:
            assert (folder / rel).is_file(), rel
        return found

    first = links(out / "report")
    assert any(rel.startswith("gallery/") for rel in first) and "confusion.png" in first
    assert any(rel.startswith("classes/") for rel in first)
    # A run folder missing an overlay still renders, without a link to it.
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("report"))
    row = next(r for r in pq.read_table(copy / "results.parquet").to_pylist() if r["image_file"])
    (copy / row["gradcam/features/overlay_pred"]).unlink()
    index = render_run_report(copy, gallery=100)
    assert index == copy / "report" / "index.html"
    second = links(copy / "report")
    assert not any(row["gradcam/features/overlay_pred"].replace("/", "_") in rel for rel in second)
    # Re-rendering replaces a previous report; someone else's folder is never deleted.
    assert render_run_report(copy) == index
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputFolderError, match="not written by cnnlens"):
        render_run_report(copy, out=mine)
    assert (mine / "notes.txt").is_file()
    # A user's file put into a cnnlens report folder survives the next report; the report's own files are
    # replaced (the marker lists exactly those).
    (copy / "report" / "notes.txt").write_text("keep")
    assert render_run_report(copy, gallery=0) == index
    assert (copy / "report" / "notes.txt").read_text() == "keep"
    assert not list((copy / "report").glob("gallery/*"))  # the previous report's gallery pictures went


# -- resumability ---------------------------------------------------------------------------------------
def _rows(path: Path) -> dict[str, dict[str, Any]]:
    rows = pq.read_table(path / "results.parquet").to_pylist()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows)  # no duplicate
    return by_path


def _assert_same_rows(a: Path, b: Path) -> None:
    ra, rb = _rows(a), _rows(b)
    assert set(ra) == set(rb)  # no missing path
    for key, row in ra.items():
        other = rb[key]
        assert set(row) == set(other)
        for col, value in row.items():
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert other[col] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, col)
            else:
                assert other[col] == value, (key, col)
    for f in a.rglob("*.npy"):
        np.testing.assert_allclose(np.load(f), np.load(b / f.relative_to(a)), rtol=1e-4, atol=1e-6)
    leftovers = [p for p in b.rglob(".*") if ".tmp-" in p.name]
    assert not leftovers


def _wait_for(predicate: Any, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before it could be killed")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run to commit a shard")
        time.sleep(0.02)


def test_resume_after_sigkill_gives_the_same_rows(planted: Planted, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    args = ["--batch-size", "4", "--shard-size", "8"]
    assert runs_main([*planted.args(planted.small, reference, workers="0"), *args]) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PLANTED_DELAY": "0.08", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cnnlens.runs", *planted.args(planted.small, out, workers="1"), *args]

    def shards() -> int:
        return len(list((out / "shards").glob("rows-*.parquet"))) if (out / "shards").is_dir() else 0

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: shards() >= 1, proc)
        time.sleep(0.1)  # mid-way through the next shard: some of its maps or overlays may be on disk
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.parquet").exists()
    assert 0 < shards() < 3
    assert runs_main([*planted.args(planted.small, out, workers="0"), *args]) == 0
    _assert_same_rows(reference, out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] >= 8 and summary["processed"] + summary["skipped"] == 24


class Crash(BaseException):
    """Stands in for a kill between two writes."""


def test_crash_between_any_two_writes_then_resume(
    planted: Planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_run_model(
        f"{planted.net_file}:build", weights=planted.weights, input_size=[32], mean=[0.5], std=[0.5],
        class_names=planted.classes,
    )  # fmt: skip
    data = read_dataset(planted.small, model.class_names)
    data = data.limit(18)
    settings = RunSettings(methods=("gradcam", "gradcampp"), overlay_format="png")
    reference = tmp_path / "reference"
    real_replace = os.replace
    calls: list[str] = []

    def counting(src: Any, dst: Any) -> None:
        calls.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", counting)
    run_dataset(reference, data, model, settings, shard_size=8, batch_size=4, workers=0)
    total = len(calls)
    assert total > 10
    # the folder's marker, run.json, shard 1, shard 2, the manifest
    for k in sorted({1, 2, total // 3, (2 * total) // 3, total - 2}):
        out = tmp_path / f"crash{k}"
        count = [0]

        def faulty(src: Any, dst: Any, k: int = k, count: list[int] = count) -> None:
            count[0] += 1
            if count[0] == k:
                raise Crash(str(dst))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", faulty)
        with pytest.raises(Crash):
            run_dataset(out, data, model, settings, shard_size=8, batch_size=4, workers=0)
        monkeypatch.setattr(os, "replace", real_replace)
        # What a SIGKILL could also leave once the run has claimed its folder (marker written): a temporary file
        # and an unreadable rows file.
        if (out / MARKER).is_file():
            (out / "shards").mkdir(exist_ok=True)
            (out / "shards" / ".rows-000001.parquet.tmp-4242-1").write_bytes(b"partial")
            if not (out / "shards" / "rows-000002.parquet").exists():
                (out / "shards" / "rows-000002.parquet").write_bytes(b"not parquet")
        summary = run_dataset(out, data, model, settings, shard_size=8, batch_size=4, workers=0)
        assert summary.total == 18
        _assert_same_rows(reference, out)
    overlays = list(reference.rglob("overlays/*/*"))
    assert overlays and all(p.suffix == ".png" for p in overlays)


# -- configuration ------------------------------------------------------------------------------------------
def test_changed_config_is_refused_and_overwrite_starts_over(
    planted: Planted, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    base = planted.args(planted.small, out, workers="0")
    assert runs_main([*base, "--limit", "8"]) == 0
    capsys.readouterr()
    assert runs_main([*base, "--limit", "8", "--method", "gradcampp"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "settings.methods" in err and "--overwrite" in err
    assert runs_main([*base, "--limit", "12"]) == 2
    assert "dataset.samples" in capsys.readouterr().err
    # Same command again: nothing to do, same results.
    assert runs_main([*base, "--limit", "8"]) == 0
    assert "already done" in capsys.readouterr().err
    assert runs_main([*base, "--limit", "8", "--method", "gradcampp", "--overwrite"]) == 0
    cols = pq.read_table(out / "results.parquet").column_names
    assert "gradcampp/features/avg_drop_pred" in cols and not any(c.startswith("gradcam/") for c in cols)
    assert not (out / "maps" / "gradcam@features").exists()
    # A folder with someone else's files is not a run folder.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert runs_main(planted.args(planted.small, foreign, workers="0")) == 2
    assert "not written by cnnlens" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"


def test_usage_errors_exit_2(planted: Planted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert runs_main(planted.args(tmp_path / "nope.csv", tmp_path / "o", workers="0")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert runs_main(["report", str(tmp_path)]) == 2
    assert "not a cnnlens run folder" in capsys.readouterr().err
    assert runs_main([*planted.args(planted.small, tmp_path / "o2", workers="0"), "--batch-size", "0"]) == 2


def test_cli_wiring_into_a_parser() -> None:
    parser = argparse.ArgumentParser()
    add_run_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["run", "data", "--out", "r", "--method", "gradcam", "gradcampp", "--workers", "0"])
    assert args.command == "run" and args.method == ["gradcam", "gradcampp"]
    assert handler(args.command).__name__ == "cmd_run" and args.overwrite is False  # the one dispatch table
    args = parser.parse_args(["report", "r", "--gallery", "5", "--overwrite"])
    assert handler(args.command).__name__ == "cmd_report" and args.gallery == 5 and args.overwrite


# -- the per-batch function ---------------------------------------------------------------------------------------
def test_process_batch_is_a_pure_function_of_model_and_batch(planted: Planted) -> None:
    model = load_run_model(
        f"{planted.net_file}:build", weights=planted.weights, input_size=[32], mean=[0.5], std=[0.5],
        class_names=planted.classes,
    )  # fmt: skip
    data = read_dataset(planted.table, model.class_names)
    samples = [*data.samples[:6], next(s for s in data.samples if s.path.endswith("broken.png"))]
    batch = collate([decode_sample(s, model.spec.preprocessing) for s in samples])
    settings = RunSettings(methods=("gradcam", "gradcampp"), top_k=10)
    model.module.train()
    first = process_batch(model, batch, settings)
    second = process_batch(model, batch, settings)
    assert model.module.training and all(p.grad is None for p in model.module.parameters())
    model.module.eval()
    assert first.rows == second.rows
    for a, b in zip(first.maps, second.maps, strict=True):
        assert a is not None and b is not None
        np.testing.assert_array_equal(a, b)
        assert a.shape == (7, 2, 32, 32) and not a[6].any()
    assert first.rows[6]["status"] == "error" and first.rows[6]["prediction"] is None
    assert len(first.rows[0]["top_k_classes"]) == 4  # capped at the number of classes
    wrong = [i for i, r in enumerate(first.rows) if r["correct"] is False]
    assert {p.row for p in first.pictures} == set(wrong)
    assert all(p.render().shape == (32, 32, 3) for p in first.pictures)
    maps = first.maps[0]
    assert maps is not None
    for i, row in enumerate(first.rows[:6]):
        assert row["box_input"] == row["box"]  # 32x32 in, 32x32 model input: same pixels
        assert (maps[i, 1].any()) == (i in wrong)


# -- datasets and models ---------------------------------------------------------------------------------------
def test_read_dataset_tree_tables_and_label_forms(tmp_path: Path) -> None:
    names = ["cat", "dog", "bird"]
    for folder in ("cat", "1", "Bird"):
        (tmp_path / "tree" / folder / "sub").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "tree" / folder / "sub" / "a.png")
        (tmp_path / "tree" / folder / "notes.txt").write_text("ignored")
    tree = read_dataset(tmp_path / "tree", names)
    assert tree.kind == "folder" and [s.label for s in tree.samples] == [1, 2, 0]  # sorted: 1, Bird, cat
    (tmp_path / "tree" / "cow").mkdir()
    with pytest.raises(DatasetError, match="cow"):
        read_dataset(tmp_path / "tree", names)
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("path,label,x0,y0,x1,y1\na.png,dog,1,2,5,6\n/abs/b.png,2,,,,\nc.png, cat ,,,,\n")
    table = read_dataset(csv_file, names)
    assert [s.label for s in table.samples] == [1, 2, 0]
    assert table.samples[0].box == (1.0, 2.0, 5.0, 6.0) and table.samples[1].box is None
    assert table.samples[0].path == str(tmp_path / "a.png") and table.samples[1].path == "/abs/b.png"
    assert read_dataset(csv_file, names, root=tmp_path / "imgs").samples[0].path == str(tmp_path / "imgs" / "a.png")
    pq.write_table(pa.table({"path": ["x.png", "y.png"], "label": [2, 0]}), tmp_path / "t.parquet")
    assert [s.label for s in read_dataset(tmp_path / "t.parquet", names).samples] == [2, 0]
    bad = tmp_path / "bad.csv"
    for body, message in (
        ("path,label\na.png,dgo\n", "Did you mean 'dog'"),
        ("path,label\na.png,7\n", "out of range"),
        ("path,label,x0,y0\na.png,1,2,3\n", "not all of x0,y0,x1,y1"),
        ("path,label,x0,y0,x1,y1\na.png,1,5,5,5,9\n", "empty"),
        ("path,label,x0,y0,x1,y1\na.png,1,1,1,,\n", "only some"),
        ("file,label\na.png,1\n", "lacks column"),
        ("path,label\na.png,1\na.png,1\n", "twice"),
    ):
        bad.write_text(body)
        with pytest.raises(DatasetError, match=message):
            read_dataset(bad, names)


def test_box_follows_resize_and_center_crop() -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[5:20, 10:30] = 255  # box x 10..30, y 5..20
    prep = Preprocessing(input_size=(24, 24), resize=30, mean=(0.5,) * 3, std=(0.5,) * 3)
    shown = prep.display_image(image)[..., 0] > 127
    ys, xs = np.nonzero(shown)
    x0, y0, x1, y1 = box_to_input((10.0, 5.0, 30.0, 20.0), (40, 60), prep)
    assert abs(x0 - xs.min()) <= 1 and abs(x1 - (xs.max() + 1)) <= 1
    assert abs(y0 - ys.min()) <= 1 and abs(y1 - (ys.max() + 1)) <= 1


def test_entry_point_model_loading(planted: Planted, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_entry_point("pkg.mod:build") and is_entry_point("some/file.py:make.net")
    assert not is_entry_point("timm:resnet18") and not is_entry_point("torchvision:resnet50")
    assert not is_entry_point("resnet50") and not is_entry_point("C:\\models\\net")
    monkeypatch.syspath_prepend(str(planted.root))
    model = load_run_model(
        "planted_net:build", weights=planted.weights, input_size=[32], mean=[0.5], std=[0.5],
        class_names=planted.classes,
    )  # fmt: skip
    assert model.spec.num_classes == 4 and model.class_names == list(NAMES)
    assert model.spec.preprocessing.input_size == (32, 32) and model.spec.default_layer == "features"
    assert model.weights_source.startswith("checkpoint") and not model.module.training
    by_file = load_run_model(f"{planted.net_file}:build", num_classes=3, input_size=[32, 32])
    assert by_file.spec.num_classes == 3 and by_file.spec.preprocessing.mean == (0.485, 0.456, 0.406)
    with pytest.raises(ModelConfigError, match="takes no num_classes"):
        load_run_model("planted_net:build_fixed", num_classes=3, input_size=[32])
    with pytest.raises(ModelNotFoundError, match="cannot import"):
        load_run_model("no_such_module_xyz:build", input_size=[32])
    with pytest.raises(ModelNotFoundError, match="has no attribute 'nope'"):
        load_run_model("planted_net:nope", input_size=[32])
    with pytest.raises(ModelConfigError, match="returned int"):
        load_run_model("planted_net:not_a_model", input_size=[32])
    with pytest.raises(ModelConfigError, match="--input-size"):
        load_run_model("planted_net:build")
    with pytest.raises(ModelConfigError, match="--random-weights"):
        load_run_model("planted_net:build", random_weights=True, input_size=[32])
    # A factory may return a ready LoadedModel; a zoo architecture takes the same preprocessing overrides.
    (tmp_path / "ready_net.py").write_text(
        "from cnnlens.runs import load_run_model\n"
        f"def make():\n    return load_run_model({str(planted.net_file) + ':build'!r}, input_size=[32])\n"
    )
    ready = load_run_model(f"{tmp_path / 'ready_net.py'}:make", weights=planted.weights, mean=[0.5], std=[0.5])
    assert ready.spec.preprocessing.mean == (0.5, 0.5, 0.5) and ready.weights_source.startswith("checkpoint")
    zoo = load_run_model("resnet18", num_classes=3, random_weights=True, input_size=[32], mean=[0.5], std=[0.5])
    assert zoo.spec.preprocessing.input_size == (32, 32) and zoo.spec.preprocessing.resize == 32


def test_run_metrics_are_the_metrics_package_numbers(planted: Planted) -> None:
    """Average Drop, energy in box and pointing of a run's rows are cnnlens.metrics' (and the literal formula's)."""
    from cnnlens import metrics
    from cnnlens.execution import Execution

    model = load_run_model(
        f"{planted.net_file}:build", weights=planted.weights, input_size=[32], mean=[0.5], std=[0.5],
        class_names=planted.classes,
    )  # fmt: skip
    data = read_dataset(planted.table, model.class_names)
    samples = [s for s in data.samples if not s.path.endswith("broken.png")][:8]
    batch = collate([decode_sample(s, model.spec.preprocessing) for s in samples])
    layer = "features"
    result = process_batch(model, batch, RunSettings(methods=("gradcam",), layers=(layer,), overlays=False))
    rows, x = result.rows, batch.inputs
    boxes = [list(b) for b in batch.boxes if b is not None]
    assert len(boxes) == len(rows) == 8
    exp = explain(model, x, methods=["gradcam"], layers=[layer])[0]  # the predicted class: rows' *_pred columns
    drop = metrics.average_drop(model, x, exp, options=metrics.MetricOptions(execution=Execution(chunk_size=3)))
    energy = metrics.energy_in_box(exp, boxes=boxes)
    hit = metrics.pointing_game(exp, boxes=boxes)
    # the literal Grad-CAM++ formula: E = ((x * std + mean) * L - mean) / std, drop = max(0, Y - O) / Y
    with torch.no_grad():
        y = torch.softmax(model.module(x).double(), dim=1)
        e = ((x.double() * 0.5 + 0.5) * exp.maps[:, 0, None].double() - 0.5) / 0.5
        o = torch.softmax(model.module(e.float()).double(), dim=1)
    cls = exp.target_classes[:, 0]
    y_c, o_c = y[torch.arange(8), cls], o[torch.arange(8), cls]
    literal = (y_c - o_c).clamp(min=0) / y_c
    for j, row in enumerate(rows):
        assert row["prediction"] == int(cls[j])
        assert row[f"gradcam/{layer}/avg_drop_pred"] == pytest.approx(float(drop.drop[j]), rel=1e-6, abs=1e-9)
        assert row[f"gradcam/{layer}/avg_drop_pred"] == pytest.approx(float(literal[j]), rel=1e-5, abs=1e-7)
        assert row[f"gradcam/{layer}/increase_pred"] == bool(drop.increase[j])
        assert row[f"gradcam/{layer}/energy_in_box_pred"] == pytest.approx(float(energy.energy[j]), abs=1e-12)
        assert row[f"gradcam/{layer}/pointing_pred"] == bool(hit.hit[j])
