"""Start-up cost: ``import cnnlens`` and ``cnnlens --help`` against ``import torch`` and ``python -c pass`` (issue 10).

Measured in ONE run, each command in a fresh subprocess (nothing cached in the interpreter; the OS file cache
is warmed by one untimed round first), rounds interleaved so that load changes hit every command alike; the
median wall time of --repeats rounds:

* ``python -c pass``: the interpreter alone;
* ``python -c "import torch"``: the floor of anything that uses torch;
* ``python -c "import cnnlens"``: the package facade (public names load on first use);
* ``python -c "import cnnlens; cnnlens.explain"``: the first real use (capture, methods, explain; no
  torchvision, matplotlib, jinja2, pyarrow, scipy or skimage);
* ``cnnlens --help``: the console script (the parser only, no torch).

Goals: ``import cnnlens`` <= 1.15x ``import torch``; ``cnnlens --help`` <= 0.3 s. Also lists which of the heavy
modules each Python command imported. Run it on an idle machine for figures you record.

Usage: ``python bench/bench_import.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

HEAVY = ("torch", "torchvision", "matplotlib", "jinja2", "pyarrow", "scipy", "skimage", "rich", "timm")
IMPORT_GOAL = 1.15
HELP_GOAL_S = 0.3


def _commands() -> dict[str, list[str]]:
    script = shutil.which("cnnlens") or os.path.join(os.path.dirname(sys.executable), "cnnlens")
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import torch": [sys.executable, "-c", "import torch"],
        "import cnnlens": [sys.executable, "-c", "import cnnlens"],
        "import cnnlens; cnnlens.explain": [sys.executable, "-c", "import cnnlens; cnnlens.explain"],
        "cnnlens --help": [script, "--help"],
    }


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _heavy_imported(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted({{m.partition('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    loaded = set(done.stdout.split())
    return [name for name in HEAVY if name in loaded]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    commands = _commands()
    for argv in commands.values():  # warm the OS file cache; not timed
        _time(argv)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(max(1, args.repeats)):
        for name, argv in commands.items():
            times[name].append(_time(argv))
    median = {name: statistics.median(values) for name, values in times.items()}
    torch_s = median["import torch"]
    print(f"start-up, median of {args.repeats} fresh processes ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)")
    print(f"{'command':34} {'wall s':>8} {'x import torch':>15}  heavy modules imported")
    for name, seconds in median.items():
        code = commands[name][2] if commands[name][0] == sys.executable else None
        heavy = ", ".join(_heavy_imported(code)) if code is not None else "-"
        print(f"{name:34} {seconds:8.3f} {seconds / torch_s:15.2f}  {heavy or 'none'}")
    ratio = median["import cnnlens"] / torch_s
    help_s = median["cnnlens --help"]
    verdict = {True: "met", False: "MISSED"}
    print(f"goal import cnnlens <= {IMPORT_GOAL:.2f}x import torch: {ratio:.2f}x ({verdict[ratio <= IMPORT_GOAL]})")
    print(f"goal cnnlens --help <= {HELP_GOAL_S:.1f} s: {help_s:.3f} s ({verdict[help_s <= HELP_GOAL_S]})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"repeats": args.repeats, "median_s": median, "all_s": times}, fh, indent=2)


if __name__ == "__main__":
    main()
