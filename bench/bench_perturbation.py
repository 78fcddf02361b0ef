"""Benchmark cnnlens Score-CAM and Ablation-CAM against pytorch-grad-cam (CPU, one run of this script).

Run ``python bench/bench_perturbation.py`` (about 15-25 minutes on 2 busy cores; ``--quick`` runs one photo
and times pytorch-grad-cam's Ablation-CAM on 256 channels only, extrapolated and labelled so).

Subjects (what the issue allows so that the run finishes in minutes, not hours):

* **Score-CAM**: the embedded ``efficientnet_lite0`` (``cnnlens.load_model``, ImageNet weights) at its
  default layer ``bn2`` (1280 channels, 7x7), 224x224 sample photos from ``cnnlens.data`` preprocessed by the
  model's own preprocessing. Not ResNet50 ``layer4``: pytorch-grad-cam needs ~175 s per image there.
* **Ablation-CAM**: torchvision ``resnet50`` (``weights=None``, seeded: no weights offline; timing does not
  depend on the weights) at ``layer4`` (2048 channels, 7x7, the last stage's output), the ``chelsea`` photo
  with ImageNet normalisation (``bench/_common.sample_batch``).

Targets are the top class of each image, passed explicitly to both libraries. Each measured call runs in a
fresh subprocess of this script (``--_worker``), one after another: the worker imports every library, builds
the model and input, runs two inference forwards, resets the resident-set high-water mark
(``/proc/self/clear_refs``), runs one more inference forward and reads the mark (``VmHWM``): the baseline.
It then resets the mark, calls the method once (timed, wall clock) and reads the mark again. **Extra peak
memory** = peak - baseline: what the method needs beyond the model and an inference forward. Workers run
with glibc's mmap/trim thresholds fixed at 128 KiB so freed tensors go back to the OS (RSS follows live
bytes). Every cnnlens call measures the per-item footprint on its first chunk (real work, kept) and sizes
the other chunks from it and the memory budget (:mod:`cnnlens.batching`); nothing is remembered between calls.

Rows:

* ``pytorch-grad-cam ScoreCAM``: ``ScoreCAM(model, [layer])`` called with ``ClassifierOutputTarget(top)``;
  its default chunk of 16 masked inputs. ``cnnlens scorecam exact``: ``explain(..., methods=["scorecam"])``
  with ``align_corners=True`` (pytorch-grad-cam's upsampling) for the map comparison. ``cnnlens scorecam
  top_k=K``: fast mode (default options otherwise).
* ``pytorch-grad-cam AblationCAM``: ``AblationCAM(model, [layer])`` (its default batch of 32 ablations).
  With ``--peer-ablation-channels N`` it ablates only the first N channels (a subclass of its
  ``AblationLayer`` returns ``range(N)``; the others keep the original score) and the time is multiplied by
  ``C / N``: labelled "extrapolated". ``cnnlens ablationcam``: ``explain(..., methods=["ablationcam"])``;
  the fx tail is ``avgpool -> flatten -> fc``.

Agreement: max |difference| between pytorch-grad-cam's final maps and cnnlens' raw maps put through
pytorch-grad-cam's own post-processing (ReLU, ``(m - min) / (max + 1e-7)``, ``cv2.resize``, again).

Fast-mode fidelity: Spearman rank correlation (``scipy.stats.spearmanr``, average ranks for ties) between
the displayed 224x224 maps (ReLU, bilinear upsampling, min-max) of fast and exact Score-CAM (default
options), per photo.

Targets (from the issue): Score-CAM exact same maps (<= 1e-4) >= 1.8x faster than pytorch-grad-cam with
extra peak memory <= 600 MB; fast mode >= 10x faster with Spearman >= 0.95; Ablation-CAM at a last-stage
ResNet50 layer <= 1 s per image and >= 100x faster than pytorch-grad-cam, same maps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    describe_machine,
    fmt_seconds,
    format_table,
    machine_info,
    peak_rss_mib,
    reset_peak_rss,
    run_worker,
    sample_batch,
)

SCORE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
ABLATION_LAYER = "layer4"


# -- subjects -----------------------------------------------------------------------------------------
def load_subject(kind: str, photo: str) -> tuple[torch.nn.Module, str, torch.Tensor]:
    """(model in eval mode, layer name, input (1, 3, 224, 224))."""
    if kind == "lite0":
        import cnnlens
        from cnnlens.data import sample_image

        loaded = cnnlens.load_model("efficientnet_lite0")
        x = loaded.spec.preprocessing.to_tensor(sample_image(photo))[None]
        return loaded.module.eval(), loaded.spec.default_layer, x
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    return net, ABLATION_LAYER, sample_batch(1)


def pgc_postprocess(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing of raw maps (as tests/test_peers.py)."""
    import cv2

    def scale(m: np.ndarray) -> np.ndarray:
        m = np.maximum(m, 0)
        m = m - m.min()
        return m / (1e-7 + m.max())

    return np.stack([scale(cv2.resize(np.float32(scale(m)), (size[1], size[0]))) for m in raw])


# -- worker (fresh process per measured call) -------------------------------------------------------------
def worker(method: str, lib: str, kind: str, photo: str, option: str, out: str) -> dict[str, Any]:
    import cv2  # noqa: F401  (imported by pytorch-grad-cam; import it in every worker alike)
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    import cnnlens
    from cnnlens.capture import capture, replay_path

    net, layer, x = load_subject(kind, photo)
    with torch.inference_mode():
        for _ in range(2):
            logits = net(x)
    top = int(logits.argmax(1)[0])
    resettable = reset_peak_rss()
    with torch.inference_mode():
        net(x)
    baseline = peak_rss_mib()
    if resettable:
        reset_peak_rss()
    info: dict[str, Any] = {}
    module = dict(net.named_modules())[layer]
    start = time.perf_counter()
    if lib == "pgc" and method == "scorecam":
        with pytorch_grad_cam.ScoreCAM(model=net, target_layers=[module]) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(top)])
    elif lib == "pgc":
        channels = int(option)
        ablation_layer = pytorch_grad_cam.ablation_layer.AblationLayer()
        if channels > 0:

            class FirstChannels(pytorch_grad_cam.ablation_layer.AblationLayer):  # type: ignore[misc]
                def activations_to_be_ablated(self, activations: Any, ratio: float = 1.0) -> Any:
                    self.indices = np.int32(range(channels))
                    return self.indices

            ablation_layer = FirstChannels()
        with pytorch_grad_cam.AblationCAM(model=net, target_layers=[module], ablation_layer=ablation_layer) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(top)])
    else:
        options: dict[str, Any] = {}
        if method == "scorecam":
            options = {"align_corners": True} if option == "exact-aligned" else {}
            if option.startswith("top"):
                options = {"top_k": int(option[3:])}
        res = cnnlens.explain(net, x, methods=[method], layers=[layer], targets=[top], options={method: options})
        e = res[method, layer]
        maps = e.maps[:, 0].numpy()
        np.save(Path(out).with_suffix(".raw.npy"), e.raw[:, 0].numpy())
        info["extras"] = {k: v.tolist() for k, v in e.extras.items()}
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    np.save(Path(out).with_suffix(".maps.npy"), np.asarray(maps))
    if lib == "cnnlens" and method == "ablationcam":
        with capture(net, [layer]) as cap:
            info["replay_path"] = replay_path(cap, layer)[0]
    return {
        "seconds": seconds,
        "baseline_mib": baseline,
        "extra_mib": peak - baseline,
        "memory_probe": "VmHWM reset" if resettable else "ru_maxrss",
        "top_class": top,
        "threads": torch.get_num_threads(),
        **info,
    }


def call(tmp: Path, method: str, lib: str, kind: str, photo: str, option: str, log: Any) -> dict[str, Any]:
    out = tmp / f"{method}-{lib}-{kind}-{photo}-{option}"
    script = str(Path(__file__).resolve())
    log(f"{method} {lib} {kind} {photo} {option} ...")
    result = run_worker([script, "--_worker", method, lib, kind, photo, option, str(out)], timeout=7200)
    if "error" in result:
        raise RuntimeError(f"{method} {lib} {photo} {option}: {result['error']}")
    result["maps"] = np.load(out.with_suffix(".maps.npy"))
    raw = out.with_suffix(".raw.npy")
    result["raw"] = np.load(raw) if raw.exists() else None
    log(f"    {fmt_seconds(result['seconds'])}, extra peak {result['extra_mib']:.0f} MiB")
    return result


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.ravel(), b.ravel()).statistic)


# -- main ---------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", default=",".join(SCORE_PHOTOS), help="Score-CAM fidelity photos")
    parser.add_argument("--peer-photo", default="chelsea", help="photo for the pytorch-grad-cam Score-CAM timing")
    parser.add_argument(
        "--top-k", default="128,64", help="fast-mode top_k values (comma-separated; targets checked for the first)"
    )
    parser.add_argument(
        "--peer-ablation-channels",
        type=int,
        default=0,
        help="time pytorch-grad-cam AblationCAM on this many channels and extrapolate (0: all channels)",
    )
    parser.add_argument("--quick", action="store_true", help="one photo, top_k 128, peer ablation on 256 channels")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--_worker", nargs=6, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        print(json.dumps(worker(*args._worker)))
        return 0
    photos = args.photos.split(",")
    top_ks = [int(k) for k in args.top_k.split(",")]
    peer_channels = args.peer_ablation_channels
    if args.quick:
        photos, top_ks, peer_channels = [args.peer_photo], [128], peer_channels or 256
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {message}", file=sys.stderr, flush=True)

    info = machine_info(("torch", "torchvision", "timm", "grad-cam", "scipy"))
    print(describe_machine(info))
    results: dict[str, Any] = {"machine": info}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        # Score-CAM: peer and exact (same upsampling as the peer) on the peer photo.
        pgc_sc = call(tmp, "scorecam", "pgc", "lite0", args.peer_photo, "-", log)
        ours_sc = call(tmp, "scorecam", "cnnlens", "lite0", args.peer_photo, "exact-aligned", log)
        sc_diff = float(np.abs(pgc_postprocess(ours_sc["raw"], (224, 224)) - pgc_sc["maps"]).max())
        # Fast-mode fidelity and speed on every photo.
        fidelity: dict[str, dict[str, Any]] = {}
        for photo in photos:
            exact = call(tmp, "scorecam", "cnnlens", "lite0", photo, "exact", log)
            row: dict[str, Any] = {"exact_s": exact["seconds"], "exact_extra_mib": exact["extra_mib"]}
            row["masked_inputs"] = exact["extras"]["masked_inputs"][0][0]
            for k in top_ks:
                fast = call(tmp, "scorecam", "cnnlens", "lite0", photo, f"top{k}", log)
                row[f"top{k}_s"] = fast["seconds"]
                row[f"top{k}_extra_mib"] = fast["extra_mib"]
                row[f"top{k}_spearman"] = spearman(fast["maps"], exact["maps"])
            fidelity[photo] = row
        # Ablation-CAM on ResNet50 layer4.
        pgc_ab = call(tmp, "ablationcam", "pgc", "resnet50", "chelsea", str(peer_channels), log)
        ours_ab = call(tmp, "ablationcam", "cnnlens", "resnet50", "chelsea", "-", log)
    channels = 2048
    pgc_ab_s = pgc_ab["seconds"] * (channels / peer_channels if peer_channels else 1.0)
    ab_diff = (
        float(np.abs(pgc_postprocess(ours_ab["raw"], (224, 224)) - pgc_ab["maps"]).max())
        if not peer_channels
        else float("nan")
    )

    n = len(photos)
    exact_peak = max([ours_sc["extra_mib"], *(r["exact_extra_mib"] for r in fidelity.values())])
    exact_mean = sum(r["exact_s"] for r in fidelity.values()) / n
    sc_rows = [
        [
            "pytorch-grad-cam ScoreCAM",
            args.peer_photo,
            fmt_seconds(pgc_sc["seconds"]),
            "1.0x",
            f"{pgc_sc['extra_mib']:.0f}",
            "-",
            "-",
        ],
        [
            "cnnlens scorecam exact (align_corners=True)",
            args.peer_photo,
            fmt_seconds(ours_sc["seconds"]),
            f"{pgc_sc['seconds'] / ours_sc['seconds']:.2f}x",
            f"{ours_sc['extra_mib']:.0f}",
            f"{sc_diff:.1e}",
            "-",
        ],
        [
            "cnnlens scorecam exact",
            f"mean of {n}",
            fmt_seconds(exact_mean),
            f"{pgc_sc['seconds'] / exact_mean:.2f}x",
            f"{max(r['exact_extra_mib'] for r in fidelity.values()):.0f}",
            "-",
            "1 (itself)",
        ],
    ]
    for k in top_ks:
        mean_s = sum(r[f"top{k}_s"] for r in fidelity.values()) / n
        rho = [r[f"top{k}_spearman"] for r in fidelity.values()]
        sc_rows.append(
            [
                f"cnnlens scorecam top_k={k}",
                f"mean of {n}",
                fmt_seconds(mean_s),
                f"{pgc_sc['seconds'] / mean_s:.1f}x",
                f"{max(r[f'top{k}_extra_mib'] for r in fidelity.values()):.0f}",
                "-",
                f"min {min(rho):.4f} / mean {sum(rho) / n:.4f}",
            ]
        )
    print("\nScore-CAM, efficientnet_lite0 bn2 (1280 channels, 7x7), 224x224, one image per call\n")
    print(
        format_table(
            ["row", "photo", "s / image", "speedup", "extra peak MiB", "max |diff| vs pgc", "Spearman vs exact"],
            sc_rows,
            "llrrrrr",
        )
    )
    per_photo = [
        [
            photo,
            f"{r['masked_inputs']:.0f}",
            fmt_seconds(r["exact_s"]),
            *[f"{fmt_seconds(r[f'top{k}_s'])} / {r[f'top{k}_spearman']:.4f}" for k in top_ks],
        ]
        for photo, r in fidelity.items()
    ]
    print("\nPer photo: distinct masked inputs (of 1280), exact time, fast time / Spearman\n")
    print(
        format_table(
            ["photo", "distinct masks", "exact", *[f"top_k={k}" for k in top_ks]], per_photo, "lrrr" + "r" * len(top_ks)
        )
    )

    ab_label = f"extrapolated from {peer_channels} channels" if peer_channels else "full run"
    ab_rows = [
        [
            f"pytorch-grad-cam AblationCAM ({ab_label})",
            fmt_seconds(pgc_ab_s),
            "1.0x",
            f"{pgc_ab['extra_mib']:.0f}",
            "-",
        ],
        [
            f"cnnlens ablationcam (replay: {ours_ab.get('replay_path')})",
            fmt_seconds(ours_ab["seconds"]),
            f"{pgc_ab_s / ours_ab['seconds']:.0f}x",
            f"{ours_ab['extra_mib']:.0f}",
            "-" if peer_channels else f"{ab_diff:.1e}",
        ],
    ]
    print(f"\nAblation-CAM, resnet50 (weights=None) {ABLATION_LAYER} (2048 channels, 7x7), 224x224, one image\n")
    print(format_table(["row", "s / image", "speedup", "extra peak MiB", "max |diff| vs pgc"], ab_rows, "lrrrr"))

    best_fast = top_ks[0]  # the targets are checked for the first --top-k value
    fast_mean = sum(r[f"top{best_fast}_s"] for r in fidelity.values()) / n
    fast_rho = min(r[f"top{best_fast}_spearman"] for r in fidelity.values())
    checks = [
        ("Score-CAM exact same maps (<= 1e-4)", sc_diff <= 1e-4, f"{sc_diff:.1e}"),
        (
            "Score-CAM exact >= 1.8x faster than pytorch-grad-cam",
            pgc_sc["seconds"] / ours_sc["seconds"] >= 1.8,
            f"{pgc_sc['seconds'] / ours_sc['seconds']:.2f}x",
        ),
        (
            "Score-CAM exact extra peak <= 600 MB",
            exact_peak * 1.048576 <= 600,
            f"{exact_peak * 1.048576:.0f} MB",
        ),
        (
            f"Score-CAM fast (top_k={best_fast}) >= 10x faster",
            pgc_sc["seconds"] / fast_mean >= 10,
            f"{pgc_sc['seconds'] / fast_mean:.1f}x",
        ),
        (
            f"Score-CAM fast (top_k={best_fast}) Spearman >= 0.95 on every photo",
            fast_rho >= 0.95,
            f"min {fast_rho:.4f}",
        ),
        ("Ablation-CAM <= 1 s per image", ours_ab["seconds"] <= 1.0, fmt_seconds(ours_ab["seconds"])),
        (
            "Ablation-CAM >= 100x faster than pytorch-grad-cam",
            pgc_ab_s / ours_ab["seconds"] >= 100,
            f"{pgc_ab_s / ours_ab['seconds']:.0f}x ({ab_label})",
        ),
        (
            "Ablation-CAM same maps (<= 1e-4)",
            (ab_diff <= 1e-4) if not peer_channels else None,
            "not compared (partial peer run)" if peer_channels else f"{ab_diff:.1e}",
        ),
    ]
    print("\nTargets\n")
    print(
        format_table(
            ["target", "met", "measured"],
            [[name, "-" if ok is None else ("yes" if ok else "NO"), text] for name, ok, text in checks],
            "lll",
        )
    )
    results.update(
        scorecam={
            "pgc": _strip(pgc_sc),
            "cnnlens_aligned": _strip(ours_sc),
            "max_abs_diff": sc_diff,
            "fidelity": fidelity,
        },
        ablationcam={
            "pgc": _strip(pgc_ab),
            "pgc_seconds_per_image": pgc_ab_s,
            "pgc_label": ab_label,
            "cnnlens": _strip(ours_ab),
            "max_abs_diff": ab_diff,
        },
        checks=[{"target": name, "met": ok, "measured": text} for name, ok, text in checks],
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    log("done")
    return 0


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("maps", "raw")}


if __name__ == "__main__":
    sys.exit(main())
