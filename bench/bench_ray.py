"""Benchmark ``cnnlens run --engine ray --actors 2`` (one torch thread each) against ``--engine local`` (two threads).

Run ``python bench/bench_ray.py`` (a few minutes on 2 cores); ``--images 60`` for a smoke check.

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

Printed: images/s of each engine, the ratio ray / local (target >= 0.85), per-actor throughput, driver commit
rate and the number of actors at which the driver's commits would become the bottleneck
(``commit rate / steady per-actor rate``).
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


def main() -> None:
    """Make the photos, time both engines once each, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32)
    args = parser.parse_args()

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
        if actor["steady_images_per_s"]:
            steady.append(float(actor["steady_images_per_s"]))
    commit = engine["driver_commits_per_s"]
    print(f"driver: {engine['driver_commit_s']:.2f} s committing, {commit} images/s")
    if steady and commit:
        per_actor = sum(steady) / len(steady)
        print(
            f"scaling model: per-actor {per_actor:.1f} images/s; the driver's commits saturate at about "
            f"{commit / per_actor:.0f} actors of this kind"
        )


if __name__ == "__main__":
    main()
