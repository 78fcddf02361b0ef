"""One capture for many layers and methods, against per-layer/per-method calls (issues 3 and 5).

Measured in ONE run on ResNet50 (torchvision, weights=None, seeded, eval, 224x224, batch 1), median of
--repeats interleaved rounds after a warm-up (the pytorch-grad-cam loops: the first --peer-repeats rounds):

* baselines: inference forward; forward + full backward (``loss.backward()`` of the top logit);
* layer sweep: Grad-CAM at conv1 and all 16 bottleneck outputs (17 layers) from one ``cnnlens.explain``
  call, vs pytorch-grad-cam called once per layer (what its API requires for separate maps); the same for
  all 53 convolutions;
* five gradient CAMs (gradcam, gradcampp, xgradcam, hirescam, layercam) at ``layer4`` from one call vs one;
* Eigen-CAM at ``layer4`` vs the inference forward.

Prints ratios. Usage: ``python bench/bench_sweep.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import torchvision

import cnnlens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peer-repeats", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    blocks = [f"layer{i}.{j}" for i, n in zip(range(1, 5), (3, 4, 6, 3), strict=True) for j in range(n)]
    sweep = ["conv1", *blocks]
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]

    def forward() -> None:
        with torch.inference_mode():
            net(x)

    def forward_backward() -> None:
        xx = x.clone()
        out = net(xx)
        out[0, out.argmax()].backward()
        net.zero_grad(set_to_none=True)

    def sweep_one_call() -> None:
        cnnlens.explain(net, x, methods=["gradcam"], layers=sweep)

    def sweep_convs() -> None:
        cnnlens.explain(net, x, methods=["gradcam"], layers=convs)

    five = ["gradcam", "gradcampp", "xgradcam", "hirescam", "layercam"]

    def five_cams() -> None:
        cnnlens.explain(net, x, methods=five, layers=["layer4"])

    def one_cam() -> None:
        cnnlens.explain(net, x, methods=["gradcam"], layers=["layer4"])

    def eigen() -> None:
        cnnlens.explain(net, x, methods=["eigencam"], layers=["layer4"])

    from pytorch_grad_cam import GradCAM

    modules = dict(net.named_modules())

    def pgc_loop(layers: list[str]) -> Callable[[], None]:
        def run() -> None:
            for name in layers:
                with GradCAM(model=net, target_layers=[modules[name]]) as cam:
                    cam(input_tensor=x, targets=None)

        return run

    rows: dict[str, Callable[[], object]] = {
        "inference forward": forward,
        "forward + full backward": forward_backward,
        "cnnlens gradcam, 17 layers, one call": sweep_one_call,
        "cnnlens gradcam, 53 convs, one call": sweep_convs,
        "cnnlens 1 CAM at layer4": one_cam,
        "cnnlens 5 CAMs at layer4, one call": five_cams,
        "cnnlens eigencam at layer4": eigen,
    }
    peers: dict[str, Callable[[], object]] = {
        "pytorch-grad-cam, 17 calls (one per layer)": pgc_loop(sweep),
        "pytorch-grad-cam, 53 calls (one per conv)": pgc_loop(convs),
    }
    samples: dict[str, list[float]] = {k: [] for k in [*rows, *peers]}
    for fn in [*rows.values(), *peers.values()]:
        fn()  # warm-up
    # Interleaved rounds: every row is timed once per round, so a slow phase of a shared machine hits all rows
    # alike; the expensive peer loops run in the first --peer-repeats rounds only.
    for r in range(args.repeats):
        for name, fn in [*rows.items(), *(peers.items() if r < args.peer_repeats else [])]:
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    t = {k: statistics.median(v) for k, v in samples.items()}
    fwd, fb = t["inference forward"], t["forward + full backward"]
    print(
        f"# bench_sweep {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, ResNet50 b=1 224x224, median of {args.repeats} interleaved rounds "
        f"({args.peer_repeats} for the pytorch-grad-cam loops)"
    )
    print(f"{'row':48s} {'seconds':>9s} {'x fwd':>7s} {'x fwd+bwd':>10s}  all rounds (s)")
    for k, v in t.items():
        print(f"{k:48s} {v:9.3f} {v / fwd:7.2f} {v / fb:10.2f}  {' '.join(f'{s:.3f}' for s in samples[k])}")

    def verdict(label: str, value: float, ok: bool, target: str) -> None:
        print(f"{label}: {value:.2f} (target {target}): {'met' if ok else 'NOT met'}")

    for n, ours, loop in (
        (17, "cnnlens gradcam, 17 layers, one call", "pytorch-grad-cam, 17 calls (one per layer)"),
        (53, "cnnlens gradcam, 53 convs, one call", "pytorch-grad-cam, 53 calls (one per conv)"),
    ):
        speedup = t[loop] / t[ours]
        verdict(f"{n}-layer sweep, speed-up over the pytorch-grad-cam loop", speedup, speedup >= 20, ">= 20x")
        verdict(f"{n}-layer sweep / forward + full backward", t[ours] / fb, t[ours] / fb <= 0.8, "<= 0.8x")
    five = t["cnnlens 5 CAMs at layer4, one call"] / t["cnnlens 1 CAM at layer4"]
    verdict("5 CAMs / 1 CAM", five, five <= 1.2, "<= 1.2x")
    eig = t["cnnlens eigencam at layer4"] / fwd
    verdict("Eigen-CAM / inference forward", eig, eig <= 1.15, "<= 1.15x")


if __name__ == "__main__":
    main()
