"""Compare training configs on the same data: train each, keep its best dev epoch, write a report.

    python bench/train_sweep.py --base configs/flickr8k.yaml --device cuda \
        --experiments '{"lr5e-4": {"lr": 0.0005}, "j512": {"model": {"joint_dim": 512, "visual_dim": 512}}}' \
        --output reports/train-sweep.json

Each experiment overrides settings of the base config (nested for `model` and `loss`).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from teran.config import load_train_config
from teran.train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="configs/flickr8k.yaml", help="base training config")
    parser.add_argument("--experiments", required=True, help="JSON object: name -> settings overriding the base config")
    parser.add_argument("--device", default="cpu", help="torch device (cuda on a GPU machine)")
    parser.add_argument("--runs-dir", default="runs/sweep", help="where each experiment's checkpoints go")
    parser.add_argument("--output", default="reports/train-sweep.json", help="JSON report")
    args = parser.parse_args(argv)

    results = {}
    for name, overrides in json.loads(args.experiments).items():
        cfg = load_train_config(args.base, {"device": args.device})
        for key, value in overrides.items():
            target = getattr(cfg, key) if key in ("model", "loss") else None
            if target is not None:
                for sub_key, sub_value in value.items():
                    setattr(target, sub_key, sub_value)
            else:
                setattr(cfg, key, value)
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
        }
        print(f"{name}: best epoch {best['epoch']} rsum alignment {best['dev_rsum_alignment']:.1f} global {best['dev_rsum_global']:.1f}")
    report = {
        "command": "python bench/train_sweep.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": {
            "platform": platform.platform(),
            "device": args.device,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "experiments": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
