"""One capture for many layers and methods, against per-layer/per-method calls (issues 3 and 5).

Measured in ONE run on ResNet50 (torchvision, weights=None, seeded, eval, 224x224, batch 1), median of
--repeats timed calls after a warm-up:

* baselines: inference forward; forward + full backward (``loss.backward()`` of the top logit);
* layer sweep: Grad-CAM at conv1 and all 16 bottleneck outputs (17 layers) from one ``cnnlens.explain``
  call, vs pytorch-grad-cam called once per layer (what its API requires for separate maps), and all 53
  convolutions from one call;
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


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


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

    def pgc_loop() -> None:
        for name in sweep:
            with GradCAM(model=net, target_layers=[modules[name]]) as cam:
                cam(input_tensor=x, targets=None)

    t = {
        "inference forward": timed(forward, args.repeats),
        "forward + full backward": timed(forward_backward, args.repeats),
        "cnnlens gradcam, 17 layers, one call": timed(sweep_one_call, args.repeats),
        "cnnlens gradcam, 53 convs, one call": timed(sweep_convs, args.repeats),
        "pytorch-grad-cam, 17 calls (one per layer)": timed(pgc_loop, args.peer_repeats),
        "cnnlens 1 CAM at layer4": timed(one_cam, args.repeats),
        "cnnlens 5 CAMs at layer4, one call": timed(five_cams, args.repeats),
        "cnnlens eigencam at layer4": timed(eigen, args.repeats),
    }
    fwd, fb = t["inference forward"], t["forward + full backward"]
    print(
        f"# bench_sweep {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, ResNet50 b=1 224x224"
    )
    print(f"{'row':48s} {'seconds':>9s} {'x fwd':>7s} {'x fwd+bwd':>10s}")
    for k, v in t.items():
        print(f"{k:48s} {v:9.3f} {v / fwd:7.2f} {v / fb:10.2f}")
    loop = t["pytorch-grad-cam, 17 calls (one per layer)"]
    ours = t["cnnlens gradcam, 17 layers, one call"]
    print(f"speedup of the 17-layer sweep over the pytorch-grad-cam loop: {loop / ours:.1f}x")
    print(f"5 CAMs / 1 CAM: {t['cnnlens 5 CAMs at layer4, one call'] / t['cnnlens 1 CAM at layer4']:.2f}")
    print(f"Eigen-CAM / inference forward: {t['cnnlens eigencam at layer4'] / fwd:.2f}")


if __name__ == "__main__":
    main()
