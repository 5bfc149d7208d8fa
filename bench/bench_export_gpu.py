"""GPU throughput of an exported model directory: PyTorch eager vs ONNX Runtime CUDA vs TensorRT.

    python bench/bench_export_gpu.py --model-dir artifacts/teran-flickr8k \
        --output reports/bench-export-gpu.json

Needs a CUDA build of torch and/or `onnxruntime-gpu` (TensorRT EP: the TensorRT libraries too,
e.g. `pip install tensorrt-cu12`); see docs/gpu.md. Without a GPU or GPU provider it prints why
and exits 0 without writing anything.

Variants per graph (text_encoder, image_encoder, image_backbone) and batch size:
  torch-fp32, torch-fp16        eager PyTorch on cuda (module.half() for fp16)
  ort-cuda-fp32, ort-cuda-fp16  CUDAExecutionProvider on the fp32 / fp16 ONNX files
  ort-trt-fp32, ort-trt-fp16    TensorrtExecutionProvider on the fp32 file (trt_fp16_enable for fp16),
                                engine cache + shape profiles from the manifest limits
Timings are end to end per call (host numpy in, host numpy out, as a server sees them);
items/s = batch / median latency. Each variant's outputs are compared with torch-fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from export.triton import typical_regions  # noqa: E402
from teran.manifest import load_manifest  # noqa: E402

GRAPHS = ("text_encoder", "image_encoder", "image_backbone")
VARIANTS = ("torch-fp32", "torch-fp16", "ort-cuda-fp32", "ort-cuda-fp16", "ort-trt-fp32", "ort-trt-fp16")


def gpu_status() -> dict:
    status = {"torch_cuda": False, "ort_providers": [], "nvidia_smi": None}
    try:
        import torch

        status["torch_cuda"] = bool(torch.cuda.is_available())
        status["torch"] = torch.__version__
        if status["torch_cuda"]:
            status["torch_device"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers() and hasattr(ort, "preload_dlls"):
            # CUDA / cuDNN from the nvidia-* wheels (e.g. those a CUDA torch brought) instead of system paths.
            ort.preload_dlls()
        status["ort_providers"] = ort.get_available_providers()
        status["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        if out.returncode == 0:
            status["nvidia_smi"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return status


def make_inputs(graph: str, manifest, batch: int, tokens: int, regions: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    entry = manifest.graph(graph)
    feeds = {}
    for spec in entry.inputs:
        if spec.name == "input_ids":
            ids = rng.integers(1000, 20000, size=(batch, tokens), dtype=np.int64)
            ids[:, 0], ids[:, -1] = 101, 102
            feeds[spec.name] = ids
        elif spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, tokens), dtype=np.int64)
        elif spec.name == "regions":
            feeds[spec.name] = rng.random((batch, regions, int(spec.shape[2])), dtype=np.float32) * 2
        elif spec.name == "boxes":
            xy = rng.random((batch, regions, 2), dtype=np.float32) * 0.6
            feeds[spec.name] = np.concatenate([xy, xy + 0.3], axis=-1).astype(np.float32)
        elif spec.name == "image_sizes":
            feeds[spec.name] = np.tile(np.array([[640.0, 480.0]], dtype=np.float32), (batch, 1))
        elif spec.name == "region_mask":
            feeds[spec.name] = np.ones((batch, regions), dtype=bool)
        elif spec.name == "pixels":
            feeds[spec.name] = rng.standard_normal((batch, *[int(d) for d in spec.shape[1:]]), dtype=np.float32)
        else:
            raise SystemExit(f"bench: unknown input {spec.name} of {graph}")
    return feeds


def timed(run, warmup: int, iters: int) -> tuple[list[float], object]:
    out = None
    for _ in range(warmup):
        out = run()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - t0)
    return times, out


def torch_runner(module, feeds: dict, names: list[str], half: bool):
    import torch

    def to_device(x: np.ndarray):
        t = torch.from_numpy(x).cuda()
        return t.half() if half and t.is_floating_point() else t

    def run():
        with torch.inference_mode():
            out = module(*(to_device(feeds[n]) for n in names))
            result = [o.float().cpu().numpy() if o.is_floating_point() else o.cpu().numpy() for o in out]
        torch.cuda.synchronize()
        return result

    return run


def ort_session(path: Path, variant: str, manifest, graph: str, cache_dir: Path):
    import onnxruntime as ort

    from export.triton import trt_profiles

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if variant.startswith("ort-cuda"):
        providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    else:
        cache = cache_dir / f"{graph}-{variant}"
        cache.mkdir(parents=True, exist_ok=True)
        trt = {
            "device_id": 0,
            "trt_fp16_enable": variant.endswith("fp16"),
            "trt_engine_cache_enable": True,
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": True,
            "trt_max_workspace_size": 4 << 30,
            **trt_profiles(graph, manifest),
        }
        providers = [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/bench_export_gpu.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="model directory written by python -m export")
    parser.add_argument(
        "--checkpoint", default=None, help="checkpoint for the PyTorch eager baseline (default: the manifest's source path)"
    )
    parser.add_argument("--output", default="reports/bench-export-gpu.json", help="JSON report (default reports/bench-export-gpu.json)")
    parser.add_argument("--graphs", default=",".join(GRAPHS), help="comma-separated graphs (default all in the manifest)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--batch-sizes", default="1,8,32,64", help="comma-separated batch sizes (capped at the manifest max_batch)")
    parser.add_argument("--tokens", type=int, default=16, help="caption length incl. [CLS]/[SEP] (default 16)")
    parser.add_argument(
        "--regions", type=int, default=None, help="regions per image for image_encoder (default: the model's grid, 49 for 7x7)"
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--trt-cache", default=None, help="TensorRT engine cache folder (default <model-dir>/../.trt-cache-<name>)")
    args = parser.parse_args(argv)

    status = gpu_status()
    gpu_ort = [p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p in status["ort_providers"]]
    if not status["torch_cuda"] and not gpu_ort:
        print(
            "bench_export_gpu: no GPU to measure here (torch.cuda.is_available() is False and onnxruntime offers "
            f"{status['ort_providers'] or 'no providers'}); install onnxruntime-gpu (+ TensorRT) and a CUDA torch on a GPU "
            "machine, see docs/gpu.md. Nothing written.",
            file=sys.stderr,
        )
        return 0

    model_dir = Path(args.model_dir)
    try:
        manifest = load_manifest(model_dir, verify=True)
    except Exception as exc:  # ManifestError: a clear message is enough here
        print(f"error: {exc}", file=sys.stderr)
        return 2
    graphs = [g for g in args.graphs.split(",") if g in manifest.graphs]
    variants = [v for v in args.variants.split(",") if v in VARIANTS]
    batches = sorted({min(int(b), manifest.limits.max_batch) for b in args.batch_sizes.split(",")})
    cache_dir = Path(args.trt_cache) if args.trt_cache else model_dir.parent / f".trt-cache-{manifest.model_name}"
    tokens = min(args.tokens, manifest.limits.max_tokens)
    regions = min(args.regions, manifest.limits.max_regions) if args.regions else typical_regions(manifest)

    modules = {}
    if status["torch_cuda"] and any(v.startswith("torch") for v in variants):
        from export.sources import load_source

        checkpoint = Path(args.checkpoint or manifest.source.path)
        if checkpoint.is_file():
            source = load_source(
                checkpoint, manifest.source.kind, max_tokens=manifest.limits.max_tokens, max_regions=manifest.limits.max_regions
            )
            modules = {name: g.module for name, g in source.graphs.items()}
        else:
            print(f"bench: {checkpoint} not found: skipping the PyTorch eager variants", file=sys.stderr)
    results = []
    for graph in graphs:
        names = [s.name for s in manifest.graph(graph).inputs]
        reference = {}
        for variant in variants:
            if variant.startswith("torch") and (graph not in modules):
                continue
            if variant.startswith("ort-cuda") and "CUDAExecutionProvider" not in gpu_ort:
                continue
            if variant.startswith("ort-trt") and "TensorrtExecutionProvider" not in gpu_ort:
                continue
            row_base = {"graph": graph, "variant": variant}
            try:
                if variant.startswith("torch"):
                    import copy

                    module = copy.deepcopy(modules[graph]).cuda().eval()
                    if variant.endswith("fp16"):
                        module = module.half()
                    session, build_s = None, 0.0
                else:
                    precision = "fp16" if variant == "ort-cuda-fp16" else "fp32"
                    t0 = time.perf_counter()
                    session = ort_session(manifest.graph_path(model_dir, graph, precision), variant, manifest, graph, cache_dir)
                    build_s = time.perf_counter() - t0
                    active = session.get_providers()
                    if variant.startswith("ort-trt") and "TensorrtExecutionProvider" not in active:
                        raise RuntimeError(f"TensorRT EP not active (session providers {active})")
                for batch in batches:
                    feeds = make_inputs(graph, manifest, batch, tokens, regions)
                    if session is None:
                        run = torch_runner(module, feeds, names, variant.endswith("fp16"))
                    else:
                        run = lambda s=session, f=feeds: s.run(None, f)  # noqa: E731
                    t0 = time.perf_counter()
                    first = run()
                    first_s = time.perf_counter() - t0  # includes TensorRT engine build for a new shape profile
                    times, out = timed(run, args.warmup, args.iters)
                    median = statistics.median(times)
                    row = {
                        **row_base,
                        "batch": batch,
                        "tokens": tokens if graph == "text_encoder" else None,
                        "regions": regions if graph == "image_encoder" else None,
                        "session_s": round(build_s, 3),
                        "first_call_s": round(first_s, 3),
                        "median_ms": round(median * 1e3, 3),
                        "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))] * 1e3, 3),
                        "items_per_s": round(batch / median, 1),
                    }
                    key = batch
                    if variant == "torch-fp32":
                        reference[key] = [np.asarray(o, dtype=np.float32) for o in out]
                    elif key in reference:
                        row["max_abs_diff_vs_torch_fp32"] = float(
                            max(
                                np.abs(r - np.asarray(o, dtype=np.float32)).max()
                                for r, o in zip(reference[key], out, strict=True)
                                if r.dtype == np.float32
                            )
                        )
                    del first
                    results.append(row)
                    print(
                        f"{graph:15s} {variant:14s} batch {batch:3d}: {row['median_ms']:8.2f} ms  {row['items_per_s']:9.1f} items/s",
                        flush=True,
                    )
            except Exception as exc:  # one failing variant (e.g. TensorRT libs missing) must not stop the others
                message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                results.append({**row_base, "error": message})
                print(f"{graph:15s} {variant:14s} FAILED: {message}", file=sys.stderr, flush=True)

    report = {
        "command": "python bench/bench_export_gpu.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "model_dir": str(model_dir),
        "model": {"name": manifest.model_name, "version": manifest.model_version},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(), **status},
        "settings": {
            "warmup": args.warmup,
            "iters": args.iters,
            "tokens": tokens,
            "regions": regions,
            "batches": batches,
            "trt_cache": str(cache_dir),
        },
        "timing": "end to end per session.run / module call: host numpy in, host numpy out; items/s = batch / median",
        "results": results,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
