"""``cnnlens run --engine ray``: the same run folder as the local engine, on a Ray cluster this module starts.

One local cluster (``ray.init(num_cpus=2)``) serves every test. A small CNN with seeded random weights (its
mistakes give overlays) is explained by the local engine once (the reference) and by Ray in each test: the
rows of ``results.parquet``, the map files and the overlay names must be the reference's, after a plain run,
after an actor is killed mid-run, and after the driver is killed and the run is continued. Workers that cannot
import the model's factory and an address where no cluster answers give clear errors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tests.test_runs import NAMES, import_file, write_dataset
from torch import nn

from cnnlens.report import render_run_report
from cnnlens.runs import load_run_model, read_dataset, run_dataset
from cnnlens.runs.__main__ import main as runs_main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.xdist_group("ray")  # one xdist worker, one cluster (make test uses --dist loadgroup)
from cnnlens.runs.ray_engine import (  # noqa: E402  (after the skip: needs Ray)
    ModelRecipe,
    RayEngineError,
    RayOptions,
    plan_resources,
)

SHARD, BATCH = 4, 4
NET = '''
"""A small CNN; forward() records the pid of each process that runs it and sleeps DELAY_FILE seconds."""
import os
import time
from pathlib import Path

from torch import nn

HERE = Path(__file__).parent
SEEN = set()


class Small(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        if os.getpid() not in SEEN:  # the driver ships the model by value: actors never call build()
            SEEN.add(os.getpid())
            with open(HERE / "pids.txt", "a") as fh:
                fh.write(f"{os.getpid()}\\n")
        delay = HERE / "delay.txt"
        if delay.exists():
            time.sleep(float(delay.read_text() or 0))
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(num_classes=4):
    return Small(num_classes)
'''


@dataclass
class Setup:
    root: Path
    net: Path
    weights: Path
    classes: Path
    table: Path
    reference: Path
    address: str

    def args(self, out: Path, *extra: str) -> list[str]:
        return [
            "run", str(self.table), "--model", f"{self.net}:build", "--weights", str(self.weights),
            "--input-size", "32", "--mean", "0.5", "--std", "0.5", "--class-names", str(self.classes),
            "--out", str(out), "--batch-size", str(BATCH), "--shard-size", str(SHARD), *extra,
        ]  # fmt: skip

    def recipe(self) -> ModelRecipe:
        return ModelRecipe(
            f"{self.net}:build",
            {
                "weights": str(self.weights),
                "input_size": [32],
                "mean": [0.5],
                "std": [0.5],
                "class_names": str(self.classes),
            },
        )

    def delay(self, seconds: float) -> None:
        (self.net.parent / "delay.txt").write_text(str(seconds))

    def actor_pids(self) -> list[int]:
        pids_file = self.net.parent / "pids.txt"
        pids = [int(v) for v in pids_file.read_text().split()] if pids_file.exists() else []
        return [p for p in dict.fromkeys(pids) if p != os.getpid() and _alive(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("ray")
    net = root / "net" / "small_net.py"
    net.parent.mkdir()
    net.write_text(NET)
    weights = root / "small.pt"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(import_file(net).Small(4).state_dict(), weights)
    classes = root / "classes.txt"
    classes.write_text("\n".join(NAMES) + "\n")
    table = write_dataset(root / "data", 6, seed=2, bad=True)  # 24 images and 3 unreadable files: 7 shards
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        info = Setup(root, net, weights, classes, table, root / "reference", ray.get_runtime_context().gcs_address)
        assert runs_main(info.args(info.reference, "--workers", "0")) == 1  # error rows: exit code 1
        yield info
    finally:
        ray.shutdown()


def _assert_same_run(ref: Path, out: Path) -> None:
    """Every column of every row equal (floats to rounding), the same map files, the same overlay names."""
    a, b = pq.read_table(ref / "results.parquet"), pq.read_table(out / "results.parquet")
    assert a.schema == b.schema
    assert a.num_rows == b.num_rows and b.column("index").to_pylist() == list(range(b.num_rows))
    for name in a.column_names:
        left, right = a.column(name).to_pylist(), b.column(name).to_pylist()
        if a.schema.field(name).type in ("double", "list<item: double>"):
            assert [v is None for v in left] == [v is None for v in right], name
            flat = [(x, y) for x, y in zip(left, right, strict=True) if x is not None]
            np.testing.assert_allclose(*(np.array(v, dtype=float) for v in zip(*flat, strict=True)), rtol=1e-6)
        else:
            assert left == right, name
    maps = sorted(p.relative_to(ref) for p in (ref / "maps").rglob("*.npy"))
    assert maps and maps == sorted(p.relative_to(out) for p in (out / "maps").rglob("*.npy"))
    for rel in maps:
        np.testing.assert_allclose(np.load(ref / rel), np.load(out / rel), rtol=1e-5, atol=1e-6)
    overlays = sorted(p.relative_to(ref) for p in (ref / "overlays").rglob("*.jpg"))
    assert overlays and overlays == sorted(p.relative_to(out) for p in (out / "overlays").rglob("*.jpg"))
    assert (
        json.loads((ref / "run.json").read_text())["fingerprint"]
        == json.loads((out / "run.json").read_text())["fingerprint"]
    )
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]


def _shards(out: Path) -> int:
    return len(list((out / "shards").glob("rows-*.parquet"))) if (out / "shards").is_dir() else 0


def test_resources_leave_room_for_decoding() -> None:
    plan = plan_resources(2, 0, RayOptions(actors=2))
    assert plan.actors * plan.cpus_per_actor + plan.read_cpus <= 2 and plan.threads == 1
    assert plan.read_tasks == 1 and plan_resources(64, 0, RayOptions(actors=7)).read_tasks == 3
    assert plan_resources(16, 4, RayOptions(gpus_per_actor=1)).read_tasks is None  # GPU actors: Ray Data decides
    assert plan_resources(2, 0, RayOptions()).actors == 1
    assert plan_resources(16, 4, RayOptions(gpus_per_actor=1)).actors == 4
    with pytest.raises(RayEngineError, match="GPU"):
        plan_resources(16, 1, RayOptions(actors=2, gpus_per_actor=1))
    with pytest.raises(RayEngineError, match="no CPU for decoding"):
        plan_resources(2, 0, RayOptions(actors=2, cpus_per_actor=1))
    with pytest.raises(RayEngineError, match="--actors"):
        RayOptions(actors=0).validate()


def test_workers_receive_a_cpu_model_copied_tensor_by_tensor() -> None:
    """A driver model on a GPU goes to the workers as a CPU copy (a CPU actor cannot load CUDA tensors).

    No GPU here: the copy mechanism runs on a CPU module (the GPU case differs only in where ``.cpu()`` copies
    from), and a CPU model is sent as it is.
    """
    from cnnlens.runs.ray_engine import _deepcopy_to_cpu, _on_cpu

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net[0].bias.requires_grad_(False)
    net.tag = {"layers": [1, 2]}  # type: ignore[assignment]  # a plain attribute is deep-copied too
    copied = _deepcopy_to_cpu(net)
    assert copied is not net and copied.tag == net.tag and copied.tag is not net.tag
    for (name, a), (_, b) in zip(net.state_dict().items(), copied.state_dict().items(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert [p.requires_grad for p in copied.parameters()] == [True, False, True, True]
    assert all(isinstance(p, nn.Parameter) for p in copied.parameters())
    model = load_run_model("resnet18", random_weights=True)
    assert _on_cpu(model) is model


def test_ray_run_equals_the_local_run_even_when_an_actor_is_killed(
    setup: Setup, capfd: pytest.CaptureFixture[str]
) -> None:
    """CLI, two actors; one actor process is SIGKILLed after the first commit: Ray restarts it, its shard is redone."""
    out = setup.root / "cli"
    setup.delay(0.15)
    (setup.net.parent / "pids.txt").unlink(missing_ok=True)
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(runs_main(setup.args(out, "--engine", "ray", "--actors", "2")))
    )
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while _shards(out) < 1 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        victims = setup.actor_pids()
        assert victims and _shards(out) < 7, "killed too late: the run had finished"
        os.kill(victims[0], signal.SIGKILL)
    finally:
        setup.delay(0)
        thread.join(timeout=300)
    assert codes == [1]  # the reference's exit code: the same three unreadable files
    _assert_same_run(setup.reference, out)
    rows = pq.read_table(out / "results.parquet").to_pylist()
    bad = {Path(r["path"]).name: r["error"] for r in rows if r["status"] == "error"}
    assert set(bad) == {"broken.png", "empty.png", "missing.png"} and all(bad.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processed"] == summary["total"] == 27 and summary["skipped"] == 0
    engine = json.loads((out / "manifest.json").read_text())["extra"]["engine"]
    assert engine["name"] == "ray" and engine["actors"] == 2 and engine["model_transfer"] == "by value"
    assert sum(a["images"] for a in engine["throughput"]) == len(rows)
    printed = capfd.readouterr()
    assert "ray actors" in printed.out
    assert "Dataset" not in printed.err and "streaming_executor" not in printed.err  # Ray Data's own logs are off
    render_run_report(out)  # the report reads a Ray run as it reads a local one
    assert (out / "report" / "index.html").is_file()


def test_keras_model_is_built_by_each_worker_with_the_drivers_options(setup: Setup, tmp_path: Path) -> None:
    """A Keras model (variables in Keras, not in the module) is rebuilt on each worker, --preprocess included."""
    if importlib.util.find_spec("keras") is None:
        pytest.skip("Keras models need keras 3 (pip install 'cnnlens[keras]')")
    from cnnlens.models.keras import import_keras

    keras = import_keras()
    keras.utils.set_random_seed(3)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inp)
    out = keras.layers.Dense(4, activation="softmax", name="head")(keras.layers.GlobalAveragePooling2D()(x))
    saved = tmp_path / "tiny.keras"
    keras.Model(inp, out, name="tiny").save(saved)
    argv = ["run", str(setup.table), "--model", str(saved), "--preprocess", "caffe", "--method", "gradcam"]
    argv += ["--class-names", str(setup.classes), "--batch-size", str(BATCH), "--shard-size", str(SHARD)]
    assert runs_main([*argv, "--out", str(tmp_path / "local"), "--workers", "0"]) == 1  # the 3 unreadable files
    assert runs_main([*argv, "--out", str(tmp_path / "ray"), "--engine", "ray", "--actors", "1"]) == 1
    _assert_same_run(tmp_path / "local", tmp_path / "ray")
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert manifest["extra"]["engine"]["model_transfer"] == "built by each worker"
    assert manifest["model"]["preprocessing"]["mode"] == "caffe"


def test_no_more_actors_than_shards(setup: Setup, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """One pending shard and --actors 2: one actor starts (the other would only import torch and wait)."""
    out = tmp_path / "one-shard"
    assert runs_main([*setup.args(out, "--engine", "ray", "--actors", "2"), "--limit", str(SHARD)]) == 0
    engine = json.loads((out / "manifest.json").read_text())["extra"]["engine"]
    assert engine["actors"] == 1 and [a["shards"] for a in engine["throughput"]] == [1]
    assert "concurrent actors" not in capfd.readouterr().err  # Ray Data's warning about idle actors


def test_killed_driver_then_rerun_with_storage(setup: Setup) -> None:
    out = setup.root / "driver-killed"
    setup.delay(0.3)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cnnlens.runs", *setup.args(out, "--engine", "ray", "--actors", "1")]
    command += ["--address", setup.address]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while _shards(out) < 1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        setup.delay(0)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.parquet").exists() and 0 < _shards(out) < 7
    # Continue it through the Python API, the model shipped by value, files staged on a file:// URI.
    stage = setup.root / "stage"
    model = setup.recipe()("cpu")
    dataset = read_dataset(setup.table, model.class_names)
    summary = run_dataset(
        out, dataset, model, shard_size=SHARD, batch_size=BATCH, engine="ray",
        ray=RayOptions(actors=1, storage=stage.as_uri()),
    )  # fmt: skip
    assert summary.skipped >= SHARD and summary.processed + summary.skipped == 27
    _assert_same_run(setup.reference, out)
    assert not [p for p in stage.rglob("*") if p.is_file()]  # the staged copies are gone once committed


def test_python_api_refuses_the_other_engines_options(setup: Setup, tmp_path: Path) -> None:
    """``ray=`` without ``engine="ray"``, or ``workers=`` with it, would be ignored: refused, nothing written."""
    from cnnlens.runs.errors import RunError

    model = setup.recipe()("cpu")
    dataset = read_dataset(setup.table, model.class_names)
    with pytest.raises(RunError, match="ray= options apply to engine='ray'"):
        run_dataset(tmp_path / "a", dataset, model, ray=RayOptions(actors=2))
    with pytest.raises(RunError, match="workers= sets the local engine's decoding processes"):
        run_dataset(tmp_path / "b", dataset, model, engine="ray", workers=2)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_worker_that_cannot_import_the_factory(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = tmp_path / "driver_only_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NET)
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver imports it; the cluster's workers were started before
    args = setup.args(tmp_path / "run", "--engine", "ray", "--actors", "1")
    args[args.index("--model") + 1] = "driver_only_pkg.nets:build"
    assert runs_main(args) == 2
    err = capsys.readouterr().err
    assert "could not load the model" in err and "driver_only_pkg" in err
    assert not (tmp_path / "run" / "results.parquet").exists() and _shards(tmp_path / "run") == 0


def test_address_that_does_not_answer(setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "never"
    assert runs_main([*setup.args(out, "--engine", "ray"), "--address", f"127.0.0.1:{port}"]) == 2
    assert "no Ray cluster answers at '127.0.0.1:" in capsys.readouterr().err
    assert not out.exists()


def test_model_recipe_is_the_driver_model(setup: Setup) -> None:
    """The loader the workers run gives the driver's weights (the actors check this fingerprint)."""
    from cnnlens.runs.fingerprint import model_fingerprint

    a = setup.recipe()("cpu")
    b = load_run_model(
        f"{setup.net}:build", weights=setup.weights, input_size=[32], mean=[0.5], std=[0.5], class_names=setup.classes
    )
    assert model_fingerprint(a) == model_fingerprint(b)


def test_plan_the_cluster_cannot_hold_writes_nothing(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never"
    assert runs_main([*setup.args(out, "--engine", "ray"), "--gpus-per-actor", "1"]) == 2  # a CPU-only cluster
    assert "the cluster has 0" in capsys.readouterr().err
    assert not out.exists()
