"""Benchmark ``cnnlens run --engine ray --actors 2`` (one torch thread each) against ``--engine local`` (two threads).

Run ``python bench/bench_ray.py`` (a few minutes on 2 cores); ``--images 60`` for a smoke check; ``--cli`` times
the two ``cnnlens run`` commands end to end instead (each a fresh process: imports, model, the local Ray cluster).

Data: ``--images`` (default 300) augmented JPEG photos made from the scikit-image sample photos exactly as
``bench/bench_runs.py`` makes them (crops, flips, jitter; never downloaded), in a temporary folder tree.

The same run for both engines: the embedded ``efficientnet_lite0``, Grad-CAM at its default layer, overlays,
no Average Drop, ``--batch-size`` 16, ``--shard-size`` 32 (so the shards spread over the actors); a fresh run
folder each time, and the two run folders' ``results.parquet`` are checked equal.

* ``local``: :func:`cnnlens.runs.run_dataset` with torch's threads set to 2 and the default decoding workers.
* ``ray``: the same call with ``engine="ray"``, ``RayOptions(actors=2)`` (0.75 logical CPU and one torch thread per
  actor) on a local cluster started before the timing (``ray.init(num_cpus=2)``, its start-up time reported
  apart). Its wall time includes starting the actors (a fresh Python process each, importing torch) and
  their warm-up; the per-actor throughput after their first shard is reported too, and so is the driver's
  commit rate (rows files per second of driver time, in images/s).

* ``floor``: on another fresh cluster, the same pipeline shape (``from_items`` -> one decoding task ->
  ``map_batches`` on two actors of 0.75 CPU) whose task and actors only do what every cnnlens run must do before
  its first image: the task imports the decoding code, each actor imports the run code and unpickles the model
  (torch, timm, torchvision, Ray Data). Its wall time is the cold-start floor of any run on Ray Data here.

Printed: images/s of each engine, the ratio ray / local (target >= 0.85), per-actor throughput, driver commit
rate and the number of actors at which the driver's commits would become the bottleneck
(``commit rate / steady per-actor rate``); then the floor, the best ratio a Ray Data run could reach on this
many photos (``local time / (floor + photos / the actors' steady rate)``) and the photo count from which such a
run would meet the target.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, machine_info
from bench_runs import make_photos

TARGET = 0.85


def compare(a: Any, b: Any) -> str:
    """Exact equality of the tables, or which columns differ (2 torch threads vs 1 rounds sums differently)."""
    if a.equals(b):
        return "identical"
    differ = [name for name in a.column_names if a.column(name).to_pylist() != b.column(name).to_pylist()]
    worst = 0.0
    for name in differ:
        if a.schema.field(name).type == "double":
            pairs = zip(a.column(name).to_pylist(), b.column(name).to_pylist(), strict=True)
            worst = max([worst, *(abs(x - y) for x, y in pairs if x is not None and y is not None)])
    return f"{len(differ)} column(s) differ ({', '.join(differ[:4])}), largest float difference {worst:.2e}"


FLOOR_PARTS = ("nothing", "torch", "cnnlens", "model")
"""What the floor's task and actors do, cumulatively: nothing; import torch; import cnnlens' run and decoding
modules; unpickle the model in the actors (the whole floor)."""


class _StartOnly:
    """An actor that does what every cnnlens actor does before its first image (up to ``part``), and nothing more."""

    def __init__(self, model_ref: tuple[Any, ...], part: str) -> None:
        import ray

        level = FLOOR_PARTS.index(part)
        if level >= 1:
            import torch as torch_in_worker

            torch_in_worker.set_num_threads(1)
        if level >= 2:
            import cnnlens.runs.batch
            import cnnlens.runs.ray_engine  # noqa: F401  (the explaining actor's module)
        if level >= 3:
            self.model = ray.get(model_ref[0])  # unpickling imports the model's libraries (timm, torchvision)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"shard": batch["shard"]}


def _decode_only(row: dict[str, Any], part: str) -> dict[str, Any]:
    level = FLOOR_PARTS.index(part)
    if level >= 1:
        import torch  # noqa: F401
    if level >= 2:
        import cnnlens.runs.decode  # noqa: F401  (the decoding task's imports)
    return row


def start_floor(model: Any, part: str = "model") -> float:
    """Seconds from an empty pipeline's start to its end on a fresh local cluster (2 CPUs, the run's plan)."""
    import functools

    import ray
    import ray.data

    from cnnlens.runs.ray_engine import _quiet_ray_logs

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = ctx.print_on_execution_start = False
        started = time.perf_counter()
        ref = ray.put(model)
        ds = ray.data.from_items([{"shard": i} for i in range(2)], override_num_blocks=2)
        decode = functools.partial(_decode_only, part=part)
        ds = ds.map(decode, num_cpus=0.25, compute=ray.data.TaskPoolStrategy(size=1))
        ds = ds.map_batches(
            _StartOnly,
            fn_constructor_kwargs={"model_ref": (ref,), "part": part},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=0.75,
        )
        with _quiet_ray_logs():
            ds.take_all()
        return time.perf_counter() - started
    finally:
        ray.shutdown()


def cli_end_to_end(images: int, shard_size: int, batch_size: int) -> None:
    """Wall time of ``cnnlens run`` with each engine as a user runs it, alternated twice, fresh run folders."""
    import subprocess

    from cnnlens.runs import load_run_model

    exe = str(Path(sys.executable).with_name("cnnlens"))
    with tempfile.TemporaryDirectory(prefix="cnnlens-bench-ray-cli-") as tmp:
        work = Path(tmp)
        make_photos(work / "photos", images, load_run_model("efficientnet_lite0"))
        common = ["--no-average-drop", "--shard-size", str(shard_size), "--batch-size", str(batch_size)]
        engines = {"local": [], "ray": ["--engine", "ray", "--actors", "2"]}
        times: dict[str, list[float]] = {name: [] for name in engines}
        for round_ in range(2):
            for name, flags in engines.items():
                argv = [exe, "run", str(work / "photos"), "--out", str(work / f"{name}{round_}"), *common, *flags]
                started = time.perf_counter()
                subprocess.run(argv, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
                times[name].append(time.perf_counter() - started)
    print(describe_machine(machine_info()))
    for name, values in times.items():
        print(f"cnnlens run --engine {name}: {', '.join(f'{v:.1f} s' for v in values)}")
    print(f"ratio ray / local (images/s, best of each): {min(times['local']) / min(times['ray']):.2f}")


def main() -> None:
    """Make the photos, time both engines once each, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument(
        "--floor-parts", type=int, default=0, metavar="N", help="only time the floor, N times for each of its parts"
    )
    parser.add_argument(
        "--cli",
        action="store_true",
        help="only time the two `cnnlens run` commands end to end (fresh processes: imports, model, Ray's own start)",
    )
    args = parser.parse_args()
    if args.cli:
        cli_end_to_end(args.images, args.shard_size, args.batch_size)
        return
    if args.floor_parts:
        from cnnlens.runs import load_run_model as load

        torch.set_num_threads(1)
        lite0 = load("efficientnet_lite0")
        print(describe_machine(machine_info()))
        for part in FLOOR_PARTS:
            times = [start_floor(lite0, part) for _ in range(args.floor_parts)]
            print(f"floor, task and actors doing up to '{part}': {', '.join(f'{t:.1f} s' for t in times)}")
        return

    import pyarrow.parquet as pq
    import ray

    from cnnlens.runs import RunSettings, load_run_model, read_dataset, run_dataset
    from cnnlens.runs.ray_engine import RayOptions

    model = load_run_model("efficientnet_lite0")
    settings = RunSettings(methods=("gradcam",), average_drop=False)
    with tempfile.TemporaryDirectory(prefix="cnnlens-bench-ray-") as tmp:
        work = Path(tmp)
        make_photos(work / "photos", args.images, model)
        dataset = read_dataset(work / "photos", model.class_names)
        common = {"shard_size": args.shard_size, "batch_size": args.batch_size}

        torch.set_num_threads(2)
        started = time.perf_counter()
        local = run_dataset(work / "local", dataset, model, settings, **common)
        local_s = time.perf_counter() - started

        torch.set_num_threads(1)
        started = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        init_s = time.perf_counter() - started
        try:
            started = time.perf_counter()
            remote = run_dataset(
                work / "ray", dataset, model, settings, engine="ray", ray=RayOptions(actors=2), **common
            )
            ray_s = time.perf_counter() - started
        finally:
            ray.shutdown()
        same = compare(
            pq.read_table(work / "local" / "results.parquet"), pq.read_table(work / "ray" / "results.parquet")
        )
        engine = json.loads((work / "ray" / "manifest.json").read_text())["extra"]["engine"]
        shutil.rmtree(work / "photos")
        floor_s = start_floor(model)

    n = args.images
    local_rate, ray_rate = n / local_s, n / ray_s
    print(describe_machine(machine_info()))
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other processes share the CPU)")
    print(f"local (2 torch threads): {local_s:.1f} s, {local_rate:.1f} images/s ({local.images_per_s or 0:.1f} in-run)")
    print(f"ray.init(num_cpus=2): {init_s:.1f} s (not counted)")
    print(
        f"ray --actors 2 (1 thread each): {ray_s:.1f} s, {ray_rate:.1f} images/s "
        f"({remote.images_per_s or 0:.1f} in-run, after the run folder is opened)"
    )
    print(f"ratio ray / local: {ray_rate / local_rate:.2f} (target >= {TARGET}); results: {same}")
    steady = []
    for actor in engine["throughput"]:
        print(
            f"  actor {actor['actor']}: {actor['shards']} shards, {actor['images']} images, {actor['seconds']:.1f} s "
            f"compute ({actor['images_per_s']} images/s; first shard {actor['first_shard_s']:.1f} s, then "
            f"{actor['steady_images_per_s']} images/s)"
        )
        if actor["steady_images_per_s"] or actor["images_per_s"]:  # one shard each: no steady figure, use the mean
            steady.append(float(actor["steady_images_per_s"] or actor["images_per_s"]))
    commit = engine["driver_commits_per_s"]
    print(f"driver: {engine['driver_commit_s']:.2f} s committing, {commit} images/s")
    if steady and commit:
        per_actor = sum(steady) / len(steady)
        print(
            f"scaling model: per-actor {per_actor:.1f} images/s; the driver's commits saturate at about "
            f"{commit / per_actor:.0f} actors of this kind"
        )
    if steady:
        together = sum(steady)
        best = local_s / (floor_s + n / together)
        print(
            f"start-up floor (an empty pipeline of this shape: one decoding task, 2 actors importing the run code "
            f"and unpickling the model): {floor_s:.1f} s"
        )
        print(
            f"best ratio a Ray Data run can reach on {n} photos here: {local_s:.1f} / ({floor_s:.1f} + {n} / "
            f"{together:.1f}) = {best:.2f}"
        )
        gain = 1 / local_rate - TARGET / together  # seconds per photo the target leaves to pay for the floor
        if gain > 0:
            print(
                f"a run adding nothing to the floor would meet the target ({TARGET}) from about "
                f"{TARGET * floor_s / gain:,.0f} photos"
            )
        else:
            print(f"the target ({TARGET}) cannot be met at any size: the actors' steady rate is too low")


if __name__ == "__main__":
    main()
