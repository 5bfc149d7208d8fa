"""Compare training configs on the same data: train each, keep its best dev epoch, write a report.

    python bench/train_sweep.py --base configs/flickr8k.yaml --device cuda \
        --experiments '{"lr5e-4": {"lr": 0.0005}, "j512": {"model": {"joint_dim": 512, "visual_dim": 512}}}' \
        --output reports/train-sweep.json

Each experiment overrides settings of the base config (nested for `model` and `loss`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from teran.config import load_train_config
from teran.train import train


def apply_overrides(cfg, overrides: dict):
    """Set top-level settings, and nested ones for `model` and `loss` (rebuilt, so they are
    validated again); an unknown name is an error."""
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise SystemExit(f"train_sweep: unknown setting {key!r}")
        if key in ("model", "loss"):
            try:
                value = dataclasses.replace(getattr(cfg, key), **value)
            except TypeError as exc:
                raise SystemExit(f"train_sweep: {key}: {exc}") from None
        setattr(cfg, key, value)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="configs/flickr8k.yaml", help="base training config")
    parser.add_argument("--experiments", required=True, help="JSON object: name -> settings overriding the base config")
    parser.add_argument("--device", default="cpu", help="torch device (cuda on a GPU machine)")
    parser.add_argument("--runs-dir", default="runs/sweep", help="where each experiment's checkpoints go")
    parser.add_argument("--output", default="reports/train-sweep.json", help="JSON report")
    args = parser.parse_args(argv)

    results = {}
    report = {
        "command": "python bench/train_sweep.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": {
            "platform": platform.platform(),
            "device": args.device,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "experiments": results,
    }
    for name, overrides in json.loads(args.experiments).items():
        cfg = apply_overrides(load_train_config(args.base, {"device": args.device}), overrides)
        started = time.monotonic()
        summary = train(cfg, Path(args.runs_dir) / name, None, resume=False, progress=False)
        best = max(summary["history"], key=lambda r: r["dev_rsum_alignment"] + r["dev_rsum_global"])
        results[name] = {
            "overrides": overrides,
            "steps": summary["steps"],
            "seconds": round(time.monotonic() - started, 1),
            "best_epoch": best["epoch"],
            "dev_rsum_alignment": best["dev_rsum_alignment"],
            "dev_rsum_global": best["dev_rsum_global"],
            "dev_r1": best["dev_r1"],
            "curve_rsum_alignment": [round(r["dev_rsum_alignment"], 1) for r in summary["history"]],
            "curve_rsum_global": [round(r["dev_rsum_global"], 1) for r in summary["history"]],
        }
        print(f"{name}: best epoch {best['epoch']} rsum alignment {best['dev_rsum_alignment']:.1f} global {best['dev_rsum_global']:.1f}")
        # Written after every experiment, so a run cut short still leaves what it measured.
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
