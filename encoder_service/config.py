"""Encoder service configuration: command-line flags, each with a TERAN_ENCODER_* environment variable.

Precedence: flag > environment variable > default. `python -m encoder_service --help` lists
every setting with its variable and default. The settings every service has (listeners, TLS,
bearer tokens, logs) are declared by `serving.settings.ServiceSettings`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from serving.settings import MIB, ConfigError, ServiceSettings, Settings, setting
from teran.manifest import GRAPHS, PRECISIONS

__all__ = ["ConfigError", "EncoderConfig", "build_parser", "env_name", "from_args"]

ENV_PREFIX = "TERAN_ENCODER_"


def image_format_names() -> set[str]:
    """The image formats Pillow can open here (JPEG, PNG, WEBP, GIF, ...)."""
    from PIL import Image

    Image.init()
    return set(Image.OPEN)


@dataclass
class EncoderConfig(ServiceSettings):
    model_dir: Path | None = setting(
        None, "model directory written by `python -m export` (manifest.json, tokenizer, ONNX graphs)", required=True
    )
    verify_model: bool = setting(True, "check the sha256 of every model file against manifest.json at startup")
    # network (the common listener settings, with this service's defaults)
    port: int = 50051
    metrics_port: int = 9090
    max_concurrent_rpcs: int = 1024
    max_inflight_bytes: int = setting(
        256 * MIB,
        "LIMIT: memory held by requests at once over all calls, charged at twice each message's wire size (the parsed "
        "message and the bytes handed to the decoders) and reserved before a message is read; unary calls wait up to "
        "--max-inflight-wait-ms for room, then get RESOURCE_EXHAUSTED; stream messages wait (flow control)",
    )
    max_inflight_wait_ms: float = setting(
        1000.0, "how long a unary call waits for room under --max-inflight-bytes before RESOURCE_EXHAUSTED"
    )
    # backend
    backend: str = setting("onnxruntime", "onnxruntime (in-process) or triton (remote Triton Inference Server over gRPC)")
    precision: str = setting(
        "fp32",
        "graph files to run: fp32, fp16 or int8 (fp16 is for GPUs; int8 is ONNX Runtime's quantized graphs for CPUs; "
        "responses are fp32 or fp16 on request either way)",
    )
    graph_precision: dict = setting(
        {},
        'JSON object of per-graph precisions overriding --precision, e.g. {"image_backbone": "int8", "text_encoder": "fp32"} '
        "(graphs: text_encoder, image_encoder, image_backbone)",
    )
    providers: list[str] = setting(
        ["CPUExecutionProvider"],
        "ONNX Runtime execution providers in priority order, e.g. TensorrtExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider",
    )
    provider_options: dict = setting(
        {},
        'JSON object of per-provider options, e.g. {"CUDAExecutionProvider": {"device_id": 0}, '
        '"TensorrtExecutionProvider": {"trt_fp16_enable": true, "trt_engine_cache_enable": true}}',
    )
    intra_op_threads: int = setting(0, "ONNX Runtime threads per graph run (0: one per core)")
    inter_op_threads: int = setting(0, "ONNX Runtime inter-op threads (0: default)")
    ort_spinning: bool = setting(
        False,
        "let ONNX Runtime worker threads spin-wait between runs (lower latency on dedicated cores; "
        "off by default because spinning starves the gRPC threads on small CPUs)",
    )
    triton_url: str = setting("localhost:8001", "Triton gRPC endpoint host:port (--backend triton)")
    triton_ssl: bool = setting(False, "use TLS to Triton")
    triton_root_cert: Path | None = setting(None, "PEM root certificate for --triton-ssl")
    triton_models: dict = setting(
        {},
        'JSON object mapping graph -> Triton model name, e.g. {"text_encoder": "teran_text"} '
        "(default: the names in the model directory's Triton repository)",
    )
    triton_timeout_s: float = setting(30.0, "LIMIT: seconds per Triton inference call")
    # batching
    max_batch: int = setting(0, "LIMIT: items per model run (dynamic batching); 0: the manifest's max_batch")
    max_queue_delay_ms: float = setting(1.0, "dynamic batching: longest wait for more items before a not-full batch runs")
    max_queue: int = setting(2048, "LIMIT: items waiting per graph; beyond it requests get RESOURCE_EXHAUSTED (backpressure)")
    batch_workers: int = setting(1, "batches of one graph run concurrently (1 suits a CPU; more for GPUs / Triton instances)")
    inline_lone_captions: bool = setting(
        True,
        "run a lone caption request (batcher idle) on the event loop thread: ~0.5 ms less latency per request, "
        "while other RPCs wait for that one run (a few ms); onnxruntime backend only",
    )
    length_buckets: list[int] = setting(
        [], "caption length bucket edges in word pieces (batches never mix buckets); default 8,16,32,... up to max_tokens"
    )
    max_stream_inflight: int = setting(4, "LIMIT: messages of one stream processed concurrently")
    decode_workers: int = setting(2, "threads decoding and resizing images")
    # request limits
    max_items: int = setting(256, "LIMIT: captions or images per request / stream message (INVALID_ARGUMENT beyond)")
    max_caption_chars: int = setting(1000, "LIMIT: characters per caption")
    max_tokens: int = setting(0, "LIMIT: word pieces per caption incl. [CLS]/[SEP]; 0: the manifest's max_tokens (never more)")
    max_regions: int = setting(0, "LIMIT: regions per precomputed-feature image; 0: the manifest's max_regions (never more)")
    max_image_bytes: int = setting(20 * MIB, "LIMIT: bytes per encoded image")
    max_image_pixels: int = setting(40_000_000, "LIMIT: width x height per image, checked before decoding (decompression bombs)")
    max_image_side: int = setting(16384, "LIMIT: pixels per image side (encoded images and image_width/height of region features)")
    image_formats: list[str] = setting(
        ["JPEG", "PNG", "WEBP"], "LIMIT: image formats decoded (Pillow names, e.g. JPEG,PNG,WEBP); other bytes are INVALID_ARGUMENT"
    )

    env_prefix = ENV_PREFIX

    def validate(self) -> EncoderConfig:
        self.check_common()
        need = self.require
        need(self.model_dir is not None, "model_dir", "required: the model directory written by `python -m export`")
        need(self.backend in ("onnxruntime", "triton"), "backend", f"{self.backend!r} is not one of onnxruntime, triton")
        need(
            self.backend == "onnxruntime" or not self.graph_precision,
            "graph_precision",
            "per-graph precisions apply to the onnxruntime backend (a Triton repository links its own graph files)",
        )
        need(self.precision in PRECISIONS, "precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for graph, precision in self.graph_precision.items():
            need(graph in GRAPHS, "graph_precision", f"unknown graph {graph!r}; graphs are {', '.join(GRAPHS)}")
            need(precision in PRECISIONS, "graph_precision", f"{graph}: {precision!r} is not one of {', '.join(PRECISIONS)}")
        positive = (
            "max_items", "max_caption_chars", "max_queue", "batch_workers", "max_stream_inflight", "decode_workers",
        )  # fmt: skip
        for name in positive:
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_image_bytes", "max_image_pixels", "max_image_side"):
            need(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_batch", "max_tokens", "max_regions", "intra_op_threads", "inter_op_threads"):
            need(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        need(
            self.max_inflight_bytes >= self.max_message_bytes,
            "max_inflight_bytes",
            f"must be >= --max-message-bytes ({self.max_message_bytes}), got {self.max_inflight_bytes}",
        )
        need(self.max_inflight_wait_ms >= 0, "max_inflight_wait_ms", f"must be >= 0, got {self.max_inflight_wait_ms}")
        need(self.max_queue_delay_ms >= 0, "max_queue_delay_ms", f"must be >= 0, got {self.max_queue_delay_ms}")
        need(self.triton_timeout_s > 0, "triton_timeout_s", f"must be > 0, got {self.triton_timeout_s}")
        need(all(b >= 1 for b in self.length_buckets), "length_buckets", "bucket edges must be >= 1")
        need(bool(self.providers), "providers", "at least one execution provider")
        known = image_format_names()
        unknown = [f for f in self.image_formats if f.upper() not in known]
        need(bool(self.image_formats) and not unknown, "image_formats", f"{unknown or 'none'}: give Pillow names, e.g. JPEG,PNG,WEBP")
        self.image_formats = [f.upper() for f in self.image_formats]
        root_cert = self.triton_root_cert
        need(root_cert is None or Path(root_cert).is_file(), "triton_root_cert", f"{root_cert}: file does not exist")
        return self


SETTINGS = Settings(
    ENV_PREFIX,
    EncoderConfig,
    prog="python -m encoder_service",
    description="TERAN encoder gRPC service (teran.v1.EncoderService): captions and images -> global and concept vectors. "
    "Serves grpc.health.v1 health (NOT_SERVING until the model is loaded and warmed up), server reflection, "
    "and Prometheus metrics on a separate HTTP port. Every flag can be set by the environment variable shown; "
    "settings marked LIMIT bound what a request may ask (violations: INVALID_ARGUMENT naming the field and the limit).",
)


def env_name(name: str) -> str:
    return SETTINGS.env_name(name)


def build_parser() -> argparse.ArgumentParser:
    return SETTINGS.build_parser()


def from_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> EncoderConfig:
    """Flags, then TERAN_ENCODER_* variables, then defaults -> a validated EncoderConfig."""
    return SETTINGS.from_args(argv, environ)
