"""Encoder service throughput and latency versus the same PyTorch model run eagerly in-process.

    .venv/bin/python bench/bench_encoder.py --model-dir artifacts/teran-flickr8k \
        [--checkpoint models/teran-flickr8k.pt] [--output reports/bench-encoder.json]

1. Starts `python -m encoder_service` (ONNX Runtime, CPU) as a subprocess on loopback and
   drives it with single-item requests (one caption / one JPEG each): concurrency 1 with the
   blocking client, 16 with the asyncio client; captions/s, images/s, p50/p99 latency, and from
   the service's metrics the mean batch size, handler time and model run time.
2. Runs the text graph directly with onnxruntime in this process at batch 1 (tokenize + run):
   `service_overhead_fraction_batch1` = 1 - direct_p50 / service_c1_p50 (client + gRPC + server
   + batching), `grpc_overhead_fraction_batch1` = 1 - server handler time / client latency.
3. Stops the service and runs the checkpoint's PyTorch model eagerly (teran.checkpoint.load_model
   + teran.backbones), one item at a time as requests arrive (`torch_eager_per_s`) and in batches
   of 16 (`torch_eager_batch16_per_s`); `ratio` = service_c16_per_s / torch_eager_per_s.
4. With `--precisions fp32,int8` (the default when the model directory has int8 graphs), in the
   same run for each precision: raw ONNX Runtime in this process at batch sizes 1..32 (tokenize +
   run; JPEG decode + resize + backbone + encoder) and its best batch size, and a fresh service
   started with `--precision P` at 16 concurrent one-item clients. `text.precisions.int8` etc.
   hold them; `text.int8_vs_fp32_service_ratio` / `image.int8_vs_fp32_service_ratio` are the
   int8 service's c16 throughput over the fp32 service's.
The benchmark imports torch; the service never does. Top-level `p50_ms` / `p99_ms` are the
service latencies at concurrency 1 (batch-1 requests); `c16` holds those under load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from teran.manifest import load_manifest  # noqa: E402
from teran.preprocess import decode_image, to_pixels  # noqa: E402
from teran.tokenization import CaptionTokenizer  # noqa: E402
from teran_api.encoder_client import AsyncEncoderClient, EncoderClient  # noqa: E402

SUBJECTS = [
    "a dog",
    "two children",
    "a man in a red shirt",
    "a woman",
    "a group of people",
    "a black and white dog",
    "a little girl",
    "a surfer",
    "a brown horse",
    "an older man",
]
ACTIONS = [
    "is running",
    "are playing",
    "jumps",
    "is sitting",
    "is climbing",
    "rides a bike",
    "is walking",
    "catches a ball",
    "swims",
    "stands",
]
PLACES = [
    "on the beach",
    "in the snow",
    "through the grass",
    "near a fountain",
    "on a busy street",
    "in front of a building",
    "by the lake",
    "on a rock wall",
    "in a park",
    "at night",
]
EXTRAS = ["", "", " while another dog watches", " with a yellow frisbee in its mouth", " next to a large crowd of people wearing hats"]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_captions(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(ACTIONS)} {rng.choice(PLACES)}{rng.choice(EXTRAS)} .".capitalize() for _ in range(count)]


def make_images(count: int, seed: int = 0) -> list[bytes]:
    """Photo-sized (500 x 375) JPEGs with smooth structure + noise (decode cost like real photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        picture = np.asarray(Image.fromarray(base).resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
        picture = np.clip(picture + rng.integers(-20, 20, picture.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def percentiles(latencies: list[float]) -> dict:
    array = np.asarray(latencies) * 1000
    return {
        "p50_ms": round(float(np.percentile(array, 50)), 3),
        "p99_ms": round(float(np.percentile(array, 99)), 3),
        "mean_ms": round(float(array.mean()), 3),
    }


# --------------------------------------------------------------------------- the service


class Service:
    def __init__(self, model_dir: Path, flags: list[str]):
        self.command = [sys.executable, "-m", "encoder_service", "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0"]
        self.command += ["--metrics-host", "127.0.0.1", "--metrics-port", "0", "--log-level", "INFO", *flags]
        self.lines: list[str] = []
        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        threading.Thread(target=lambda: self.lines.extend(iter(self.process.stderr.readline, "")), daemon=True).start()
        self.port = self.metrics_port = None
        end = time.monotonic() + 300
        while self.port is None:
            if self.process.poll() is not None or time.monotonic() > end:
                raise RuntimeError("encoder service did not start:\n" + "".join(self.lines[-20:]))
            for line in list(self.lines):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("msg") == "listening":
                    self.port, self.metrics_port = entry["port"], entry["metrics_port"]
            time.sleep(0.05)
        with EncoderClient(self.target) as client:
            client.wait_until_serving(300)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def histograms(self) -> dict[str, tuple[float, float]]:
        """'metric{label}' -> (sum, count) of the service's histograms so far."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        sums, counts = {}, {}
        for line in text.splitlines():
            for suffix, store in (("_sum{", sums), ("_count{", counts)):
                if suffix in line and line.startswith("teran_encoder_"):
                    name, rest = line.split(suffix, 1)
                    label = rest.split('"')[1]
                    store[f"{name}{{{label}}}"] = float(line.rsplit(" ", 1)[1])
        return {key: (sums.get(key, 0.0), counts[key]) for key in counts}

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def drive(target: str, kind: str, items: list, requests: int, concurrency: int) -> dict:
    """`requests` single-item requests from `concurrency` concurrent asyncio callers."""
    latencies: list[float] = []
    counter = iter(range(requests))
    async with AsyncEncoderClient(target, timeout=120) as client:
        call = client.encode_captions if kind == "text" else client.encode_images

        async def worker() -> None:
            for index in counter:
                started = time.perf_counter()
                await call([items[index % len(items)]])
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "requests": requests,
        "concurrency": concurrency,
        "client": "asyncio",
        "per_s": round(requests / wall, 2),
        "wall_s": round(wall, 3),
        **percentiles(latencies),
    }


def drive_sync(target: str, kind: str, items: list, requests: int) -> dict:
    """Concurrency 1: one blocking caller (the lowest-overhead Python client)."""
    latencies: list[float] = []
    with EncoderClient(target, timeout=120) as client:
        call = client.encode_captions if kind == "text" else client.encode_images
        started = time.perf_counter()
        for index in range(requests):
            t0 = time.perf_counter()
            call([items[index % len(items)]])
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - started
    return {
        "requests": requests,
        "concurrency": 1,
        "client": "sync",
        "per_s": round(requests / wall, 2),
        "wall_s": round(wall, 3),
        **percentiles(latencies),
    }


def measure_service(service: Service, kind: str, items: list, counts: dict[int, int]) -> dict:
    asyncio.run(drive(service.target, kind, items, min(32, counts.get(1, 32)), 4))  # warm connections and caches
    method = "EncodeCaptions" if kind == "text" else "EncodeImages"
    results = {}
    for concurrency, requests in counts.items():
        say(f"  service {kind}: {requests} requests at concurrency {concurrency} ...")
        before = service.histograms()
        if concurrency == 1:
            result = drive_sync(service.target, kind, items, requests)
        else:
            result = asyncio.run(drive(service.target, kind, items, requests, concurrency))
        after = service.histograms()

        def mean(key: str, scale: float = 1.0, before=before, after=after) -> float | None:
            total, count = after.get(key, (0.0, 0.0))
            old_total, old_count = before.get(key, (0.0, 0.0))
            return round((total - old_total) / (count - old_count) * scale, 3) if count > old_count else None

        graphs = ["text_encoder"] if kind == "text" else ["image_backbone", "image_encoder"]
        result["mean_batch_size"] = {g: mean(f"teran_encoder_batch_size{{{g}}}") for g in graphs}
        result["server_inference_mean_ms"] = {g: mean(f"teran_encoder_inference_seconds{{{g}}}", 1000) for g in graphs}
        result["server_handler_mean_ms"] = mean(f"teran_encoder_request_seconds{{{method}}}", 1000)
        results[concurrency] = result
        say(f"    {result['per_s']}/s p50 {result['p50_ms']} ms p99 {result['p99_ms']} ms, mean batch {result['mean_batch_size']}")
    return results


# --------------------------------------------------------------------------- direct onnxruntime (overhead reference)


def direct_text_latency(model_dir: Path, captions: list[str], requests: int) -> dict:
    import onnxruntime as ort

    manifest = load_manifest(model_dir, verify=False)
    tokenizer = CaptionTokenizer(model_dir / manifest.tokenizer_file, max_tokens=manifest.limits.max_tokens)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(manifest.graph_path(model_dir, "text_encoder")), options, providers=["CPUExecutionProvider"])
    latencies = []
    for index in range(requests + 10):
        started = time.perf_counter()
        batch = tokenizer.encode([captions[index % len(captions)]])
        session.run(None, {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask})
        if index >= 10:
            latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


def direct_image_latency(model_dir: Path, images: list[bytes], requests: int) -> dict:
    import onnxruntime as ort

    manifest = load_manifest(model_dir, verify=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    backbone = ort.InferenceSession(str(manifest.graph_path(model_dir, "image_backbone")), options, providers=["CPUExecutionProvider"])
    encoder = ort.InferenceSession(str(manifest.graph_path(model_dir, "image_encoder")), options, providers=["CPUExecutionProvider"])
    spec = manifest.pixel_spec()
    latencies = []
    for index in range(requests + 3):
        started = time.perf_counter()
        pixels = to_pixels(decode_image(images[index % len(images)]), spec)[None]
        regions, boxes, mask = backbone.run(None, {"pixels": pixels})
        encoder.run(None, {"regions": regions, "boxes": boxes, "region_mask": mask})
        if index >= 3:
            latencies.append(time.perf_counter() - started)
    return percentiles(latencies)


def _ort_session(path: Path):
    """A session as the service opens it (all optimisations, no spin-waiting)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


RAW_BATCHES = (1, 4, 8, 16, 32)


def raw_throughput(model_dir: Path, precision: str, kind: str, items: list, count: int) -> dict:
    """Items/s of raw ONNX Runtime sessions in this process at each batch size (input preparation included)."""
    manifest = load_manifest(model_dir, verify=False)
    if kind == "text":
        tokenizer = CaptionTokenizer(model_dir / manifest.tokenizer_file, max_tokens=manifest.limits.max_tokens)
        text = _ort_session(manifest.graph_path(model_dir, "text_encoder", precision))

        def run(batch: list) -> None:
            tokens = tokenizer.encode(batch)
            text.run(None, {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})

    else:
        spec = manifest.pixel_spec()
        backbone = _ort_session(manifest.graph_path(model_dir, "image_backbone", precision))
        encoder = _ort_session(manifest.graph_path(model_dir, "image_encoder", precision))
        names = [t.name for t in manifest.graph("image_encoder").inputs]

        def run(batch: list) -> None:
            pixels = np.stack([to_pixels(decode_image(data), spec) for data in batch])
            encoder.run(None, dict(zip(names, backbone.run(None, {"pixels": pixels}), strict=True)))

    per_batch = {}
    for size in RAW_BATCHES:
        run([items[j % len(items)] for j in range(size)])  # warm-up at this shape
        batches = max(2, count // size)
        started = time.perf_counter()
        for index in range(batches):
            run([items[(index * size + j) % len(items)] for j in range(size)])
        per_batch[size] = round(batches * size / (time.perf_counter() - started), 2)
    best = max(per_batch, key=lambda b: per_batch[b])
    return {"per_s_by_batch": per_batch, "best_batch": best, "best_per_s": per_batch[best]}


def compare_precisions(model_dir: Path, flags: list[str], precisions: list[str], captions, images, text_n: int, image_n: int) -> dict:
    """Per precision: raw ORT at its best batch size and a fresh service at 16 clients, captions and JPEGs."""
    out: dict = {"text": {}, "image": {}}
    for precision in precisions:
        say(f"  precision {precision}: raw onnxruntime at batch sizes {RAW_BATCHES} ...")
        raw = {
            "text": raw_throughput(model_dir, precision, "text", captions, text_n),
            "image": raw_throughput(model_dir, precision, "image", images, image_n),
        }
        say(f"  precision {precision}: service at 16 clients ...")
        service = Service(model_dir, [*flags, "--precision", precision])
        try:
            served = {
                "text": measure_service(service, "text", captions, {16: text_n}),
                "image": measure_service(service, "image", images, {16: image_n}),
            }
        finally:
            service.stop()
        for kind in ("text", "image"):
            c16 = served[kind][16]
            out[kind][precision] = {
                "raw_onnxruntime": raw[kind],
                "service_c16_per_s": c16["per_s"],
                "service_vs_raw_best": round(c16["per_s"] / raw[kind]["best_per_s"], 3),
                "c16": c16,
            }
            best = raw[kind]
            say(f"    {kind} {precision}: raw best {best['best_per_s']}/s (batch {best['best_batch']}), service c16 {c16['per_s']}/s")
    return out


# --------------------------------------------------------------------------- torch eager


def torch_eager(checkpoint: Path, model_dir: Path, captions: list[str], images: list[bytes], text_n: int, image_n: int) -> dict:
    import torch

    from teran import backbones
    from teran.checkpoint import load_model
    from teran.model import TextEncoder

    manifest = load_manifest(model_dir, verify=False)
    model, _payload = load_model(checkpoint)
    text = TextEncoder(backbones.load_text_backbone(drop_top_layers=model.config.text_tuned_layers), model.text).eval()
    grid = backbones.GridImageBackbone(manifest.pixel_spec().size, drop_top_blocks=model.config.image_tuned_blocks).eval()
    tokenizer = CaptionTokenizer(model_dir / manifest.tokenizer_file, max_tokens=manifest.limits.max_tokens)
    spec = manifest.pixel_spec()
    out: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    def run_text(batch: list[str]):
        tokens = tokenizer.encode(batch)
        return text(torch.from_numpy(tokens.input_ids), torch.from_numpy(tokens.attention_mask))

    def run_images(batch: list[bytes]):
        pixels = torch.from_numpy(np.stack([to_pixels(decode_image(data), spec) for data in batch]))
        regions, boxes = grid(pixels)
        return model.image(regions, boxes, torch.ones(regions.shape[:2], dtype=torch.bool))

    with torch.inference_mode():
        for name, run, items, count in (("text", run_text, captions, text_n), ("image", run_images, images, image_n)):
            for index in range(3):
                run([items[index]])
            latencies = []
            started = time.perf_counter()
            for index in range(count):
                t0 = time.perf_counter()
                run([items[index % len(items)]])
                latencies.append(time.perf_counter() - t0)
            out[name] = {"per_s": round(count / (time.perf_counter() - started), 2), **percentiles(latencies)}
            started = time.perf_counter()
            batches = max(1, count // 16)
            for index in range(batches):
                run([items[(index * 16 + j) % len(items)] for j in range(16)])
            out[name]["batch16_per_s"] = round(batches * 16 / (time.perf_counter() - started), 2)
            say(f"  torch eager {name}: {out[name]['per_s']}/s one at a time, {out[name]['batch16_per_s']}/s in batches of 16")
        # parity: service vectors vs torch (same inputs)
        out["text_reference"] = run_text(captions[:4]).global_vec.numpy()
        out["image_reference"] = run_images(images[:2]).global_vec.numpy()
    return out


# --------------------------------------------------------------------------- main


def machine() -> dict:
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "providers": onnxruntime.get_available_providers(),
    }


def default_checkpoint(model_dir: Path) -> Path | None:
    manifest = load_manifest(model_dir, verify=False)
    for candidate in (Path(manifest.source.path), ROOT / "models" / "teran-flickr8k.pt", ROOT / "runs" / "flickr8k" / "best.pt"):
        if candidate.is_file():
            return candidate
    return None


def batch1_overheads(c1: dict, direct: dict) -> dict:
    return {
        # everything the service adds to running the graphs in-process (client, gRPC, server, batching)
        "service_overhead_fraction_batch1": round(1 - direct["p50_ms"] / c1["p50_ms"], 4),
        # the gRPC round trip alone: client-observed latency minus time inside the server's handler
        "grpc_overhead_fraction_batch1": round(1 - c1["server_handler_mean_ms"] / c1["mean_ms"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "teran-flickr8k", help="exported model directory")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="the PyTorch checkpoint of the same model (default: the manifest's source)"
    )
    parser.add_argument("--output", type=Path, default=ROOT / "reports" / "bench-encoder.json")
    parser.add_argument("--text-requests", type=int, default=400, help="requests at concurrency 16 (a third of it at concurrency 1)")
    parser.add_argument("--image-requests", type=int, default=160, help="requests at concurrency 16 (a third of it at concurrency 1)")
    parser.add_argument("--service-flags", default="", help="extra flags for python -m encoder_service (quoted string)")
    parser.add_argument(
        "--compare-flags",
        default=None,
        help="also measure captions on a second service started with these extra flags (A/B in the same run), "
        "e.g. '--no-inline-lone-captions'",
    )
    parser.add_argument(
        "--precisions",
        default=None,
        help="precisions compared in this run (raw ORT best batch + service at 16 clients each), e.g. fp32,int8 "
        "(default: fp32,int8 when the model directory has int8 graphs; 'none' skips the comparison)",
    )
    args = parser.parse_args(argv)
    command = "python bench/bench_encoder.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    model_dir = args.model_dir.resolve()
    manifest = load_manifest(model_dir, verify=True)
    checkpoint = args.checkpoint or default_checkpoint(model_dir)
    if checkpoint is None or not Path(checkpoint).is_file():
        parser.error("no PyTorch checkpoint found for the torch baseline; pass --checkpoint")
    captions = make_captions(512)
    images = make_images(48)
    if args.precisions is None:
        has_int8 = all(entry.int8 for entry in manifest.graphs.values())
        precisions = ["fp32", "int8"] if has_int8 else []
    else:
        precisions = [] if args.precisions == "none" else [p.strip() for p in args.precisions.split(",") if p.strip()]
    text_counts = {1: max(16, args.text_requests // 3), 16: args.text_requests}
    image_counts = {1: max(8, args.image_requests // 3), 16: args.image_requests}

    say(f"[1/3] encoder service on {model_dir} ...")
    flags = shlex.split(args.service_flags)
    service = Service(model_dir, flags)
    try:
        text = measure_service(service, "text", captions, text_counts)
        image = measure_service(service, "image", images, image_counts)
        with EncoderClient(service.target) as client:
            service_text = np.stack([r.global_vector for r in client.encode_captions(captions[:4])])
            service_image = np.stack([r.global_vector for r in client.encode_images(images[:2])])
            info = client.model_info()
    finally:
        service.stop()
    compare = None
    if args.compare_flags is not None:
        say(f"[1b/3] captions again, on a service with {args.compare_flags!r} ...")
        other = Service(model_dir, flags + shlex.split(args.compare_flags))
        try:
            compare = measure_service(other, "text", captions, text_counts)
        finally:
            other.stop()
    by_precision = None
    if precisions:
        say(f"[1c/3] precisions {','.join(precisions)} in one run ...")
        by_precision = compare_precisions(model_dir, flags, precisions, captions, images, text_counts[16], image_counts[16])
    say("[2/3] onnxruntime directly in-process, batch 1 ...")
    direct_text = direct_text_latency(model_dir, captions, text_counts[1])
    direct_image = direct_image_latency(model_dir, images, image_counts[1])
    say(f"[3/3] PyTorch eager from {checkpoint} ...")
    eager = torch_eager(Path(checkpoint), model_dir, captions, images, text_counts[1], image_counts[1])

    def section(results, direct, torch_result, service_vectors, torch_vectors) -> dict:
        c1, c16 = results[1], results[16]
        return {
            "service_c1_per_s": c1["per_s"],
            "service_c16_per_s": c16["per_s"],
            "torch_eager_per_s": torch_result["per_s"],
            "torch_eager_batch16_per_s": torch_result["batch16_per_s"],
            "ratio": round(c16["per_s"] / torch_result["per_s"], 3),
            "ratio_vs_torch_batch16": round(c16["per_s"] / torch_result["batch16_per_s"], 3),
            "p50_ms": c1["p50_ms"],
            "p99_ms": c1["p99_ms"],
            "c1": c1,
            "c16": c16,
            "torch_eager_latency": {k: torch_result[k] for k in ("p50_ms", "p99_ms", "mean_ms")},
            "direct_onnxruntime_batch1": direct,
            **batch1_overheads(c1, direct),
            "max_abs_diff_global_vs_torch": float(np.abs(service_vectors - torch_vectors).max()),
        }

    report = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": machine(),
        "model_dir": str(model_dir),
        "model": {
            "name": manifest.model_name,
            "version": manifest.model_version,
            "joint_dim": manifest.joint_dim,
            "backend": info.backend_detail,
        },
        "checkpoint": str(checkpoint),
        "service_command": " ".join(shlex.quote(a) for a in service.command),
        "requests": "one caption / one 500x375 JPEG per request; asyncio client in the benchmark process, service in a subprocess",
        "torch": {"version": eager["torch"], "threads": eager["threads"]},
        "text": section(text, direct_text, eager["text"], service_text, eager["text_reference"]),
        "image": section(image, direct_image, eager["image"], service_image, eager["image_reference"]),
    }
    if compare is not None:
        c1, c16 = compare[1], compare[16]
        report["text"]["compare"] = {
            "flags": args.compare_flags,
            "service_c1_per_s": c1["per_s"],
            "service_c16_per_s": c16["per_s"],
            "p50_ms": c1["p50_ms"],
            "p99_ms": c1["p99_ms"],
            "c1": c1,
            "c16": c16,
            **batch1_overheads(c1, direct_text),
        }
    if by_precision is not None:
        for kind in ("text", "image"):
            report[kind]["precisions"] = by_precision[kind]
            if "fp32" in by_precision[kind] and "int8" in by_precision[kind]:
                fp32, int8 = by_precision[kind]["fp32"], by_precision[kind]["int8"]
                report[kind]["int8_vs_fp32_service_ratio"] = round(int8["service_c16_per_s"] / fp32["service_c16_per_s"], 3)
                report[kind]["int8_vs_fp32_raw_ratio"] = round(
                    int8["raw_onnxruntime"]["best_per_s"] / fp32["raw_onnxruntime"]["best_per_s"], 3
                )
    report["goals"] = {
        "text_c16_at_least_1_5x_torch_eager": report["text"]["ratio"] >= 1.5,
        "grpc_overhead_under_10pct_at_batch1_text": report["text"]["grpc_overhead_fraction_batch1"] < 0.10,
        "service_overhead_under_10pct_at_batch1_text": report["text"]["service_overhead_fraction_batch1"] < 0.10,
    }
    for kind in ("text", "image"):
        if "int8_vs_fp32_service_ratio" in report[kind]:
            report["goals"][f"{kind}_int8_service_at_least_1_5x_fp32"] = report[kind]["int8_vs_fp32_service_ratio"] >= 1.5
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    for kind in ("text", "image"):
        r = report[kind]
        say(
            f"{kind}: service c1 {r['service_c1_per_s']}/s (p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms), c16 {r['service_c16_per_s']}/s "
            f"(p50 {r['c16']['p50_ms']} ms); torch eager {r['torch_eager_per_s']}/s (batch 16: {r['torch_eager_batch16_per_s']}/s); "
            f"ratio {r['ratio']}; overhead at batch 1: gRPC {r['grpc_overhead_fraction_batch1']:.1%}, "
            f"service vs direct ORT {r['service_overhead_fraction_batch1']:.1%}; "
            f"|service - torch| {r['max_abs_diff_global_vs_torch']:.1e}"
        )
        if "int8_vs_fp32_service_ratio" in r:
            say(
                f"{kind}: int8 vs fp32 service at 16 clients {r['int8_vs_fp32_service_ratio']}x, raw ORT best batch "
                f"{r['int8_vs_fp32_raw_ratio']}x"
            )
    say(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
