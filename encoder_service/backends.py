"""Inference backends behind one interface: ONNX Runtime in-process, or a remote Triton server.

`run(graph, feeds)` is a plain blocking call (the batcher runs it in a worker thread); graph is
one of the manifest's graphs (text_encoder, image_encoder, image_backbone) and feeds / results
are numpy arrays keyed by the manifest's input / output names.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from encoder_service.config import ConfigError, EncoderConfig
from encoder_service.logs import get_logger
from teran.manifest import Manifest, ManifestError

log = get_logger("backend")


class BackendError(Exception):
    """The backend failed to run a batch (maps to UNAVAILABLE for a remote server, else INTERNAL)."""

    def __init__(self, message: str, unavailable: bool = False, backend: str = "inference"):
        super().__init__(message)
        self.unavailable = unavailable
        self.backend = backend  # named to clients; the message (addresses, the backend's own text) is logged


class Backend(ABC):
    kind: str = "?"

    def __init__(self, manifest: Manifest, model_dir: Path):
        self.manifest = manifest
        self.model_dir = Path(model_dir)
        self.graphs = sorted(manifest.graphs)

    @abstractmethod
    def load(self) -> None:
        """Open sessions / connect and check the graphs (blocking; called once at startup)."""

    @abstractmethod
    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch; thread-safe."""

    def describe(self) -> str:
        return self.kind

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions / connections (default: nothing to release)."""

    def output_names(self, graph: str) -> list[str]:
        return [spec.name for spec in self.manifest.graph(graph).outputs]


class OnnxRuntimeBackend(Backend):
    kind = "onnxruntime"

    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path,
        *,
        precision: str = "fp32",
        graph_precision: dict[str, str] | None = None,
        providers: list[str] | None = None,
        provider_options: dict | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
        spinning: bool = False,
    ):
        super().__init__(manifest, model_dir)
        self.spinning = spinning
        self.precision = precision
        self.graph_precision = {g: (graph_precision or {}).get(g, precision) for g in self.graphs}
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.provider_options = dict(provider_options or {})
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.sessions: dict = {}
        self.active_providers: list[str] = []

    def load(self) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise ConfigError(
                f"--providers: {', '.join(missing)} not available in this onnxruntime build (available: {', '.join(available)}); "
                "CUDA and TensorRT need the onnxruntime-gpu package and the NVIDIA libraries"
            )
        unknown = [p for p in self.provider_options if p not in self.providers]
        if unknown:
            raise ConfigError(f"--provider-options: options for {unknown} but --providers is {self.providers}")
        for graph in self.graphs:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            if self.intra_op_threads:
                options.intra_op_num_threads = self.intra_op_threads
            if self.inter_op_threads:
                options.inter_op_num_threads = self.inter_op_threads
            if not self.spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.add_session_config_entry("session.inter_op.allow_spinning", "0")
            precision = self.graph_precision[graph]
            try:
                path = self.manifest.graph_path(self.model_dir, graph, precision)
            except ManifestError as exc:
                raise ConfigError(
                    f"--precision {precision}: {self.model_dir} has no {precision} {graph} graph ({exc}); "
                    "re-export the model with this version of `python -m export`"
                ) from None
            provider_list = [(p, {str(k): str(v) for k, v in self.provider_options.get(p, {}).items()}) for p in self.providers]
            session = ort.InferenceSession(str(path), options, providers=provider_list)
            used = session.get_providers()
            if used[0] != self.providers[0]:
                log.warning("onnxruntime fell back from %s to %s for %s", self.providers[0], used[0], graph, extra={"graph": graph})
            self.sessions[graph] = session
            self.active_providers = used

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names(graph)
        try:
            outputs = self.sessions[graph].run(names, feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime failed on {graph}: {exc}", backend="ONNX Runtime") from exc
        return dict(zip(names, outputs, strict=True))

    def precision_label(self) -> str:
        """`fp32`, `int8`, ... or, with per-graph precisions, e.g. `text_encoder=int8,image_encoder=fp32,...`."""
        used = set(self.graph_precision.values())
        if used <= {self.precision}:
            return self.precision
        return ",".join(f"{g}={p}" for g, p in sorted(self.graph_precision.items()))

    def describe(self) -> str:
        return f"onnxruntime {self.precision_label()} providers={','.join(self.active_providers or self.providers)}"

    def close(self) -> None:
        self.sessions.clear()


class TritonBackend(Backend):
    """A remote Triton Inference Server (KServe v2 gRPC) serving the model directory's triton/ repository."""

    kind = "triton"

    def __init__(
        self,
        manifest: Manifest,
        model_dir: Path,
        *,
        url: str,
        ssl: bool = False,
        root_cert: Path | None = None,
        model_names: dict | None = None,
        timeout_s: float = 30.0,
    ):
        super().__init__(manifest, model_dir)
        self.url = url
        self.ssl = ssl
        self.root_cert = root_cert
        self.timeout_s = timeout_s
        self.version = str(manifest.model_version)
        repo = (manifest.extra or {}).get("triton") or {}
        known = set(repo.get("models") or self.graphs)
        self.model_names = {g: g for g in self.graphs if g in known or not repo}
        unknown = [g for g in (model_names or {}) if g not in manifest.graphs]
        if unknown:
            raise ConfigError(f"--triton-models: unknown graph(s) {unknown}; the model has {self.graphs}")
        self.model_names.update(model_names or {})
        self._local = threading.local()
        self._clients: list = []
        self._lock = threading.Lock()

    def _client(self):
        client = getattr(self._local, "client", None)
        if client is None:
            import tritonclient.grpc as triton

            client = triton.InferenceServerClient(self.url, ssl=self.ssl, root_certificates=str(self.root_cert) if self.root_cert else None)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def load(self) -> None:
        from tritonclient.utils import InferenceServerException

        client = self._client()
        try:
            if not client.is_server_live(client_timeout=self.timeout_s):
                raise BackendError(f"Triton at {self.url} is not live", unavailable=True, backend="Triton")
            for graph in self.graphs:
                name = self.model_names.get(graph)
                if name is None:
                    continue
                if not client.is_model_ready(name, self.version, client_timeout=self.timeout_s):
                    raise BackendError(
                        f"Triton at {self.url}: model {name!r} version {self.version} is not ready", unavailable=True, backend="Triton"
                    )
                meta = client.get_model_metadata(name, self.version, as_json=True, client_timeout=self.timeout_s)
                served = {i["name"] for i in meta.get("inputs", [])}
                expected = {s.name for s in self.manifest.graph(graph).inputs}
                if served != expected:
                    raise BackendError(
                        f"Triton model {name!r} has inputs {sorted(served)}, the manifest's {graph} has {sorted(expected)}",
                        backend="Triton",
                    )
        except InferenceServerException as exc:
            raise BackendError(f"Triton at {self.url}: {exc.message()}", unavailable=True, backend="Triton") from exc

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tritonclient.grpc as triton
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        name = self.model_names.get(graph)
        if name is None:
            raise BackendError(f"no Triton model configured for {graph}", backend="Triton")
        inputs = []
        for key, array in feeds.items():
            item = triton.InferInput(key, list(array.shape), np_to_triton_dtype(array.dtype))
            item.set_data_from_numpy(np.ascontiguousarray(array))
            inputs.append(item)
        names = self.output_names(graph)
        outputs = [triton.InferRequestedOutput(n) for n in names]
        try:
            result = self._client().infer(name, inputs, model_version=self.version, outputs=outputs, client_timeout=self.timeout_s)
        except InferenceServerException as exc:
            status = str(exc.status() or "")
            unavailable = any(s in status for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"))
            raise BackendError(f"Triton {name} at {self.url}: {exc.message()}", unavailable=unavailable, backend="Triton") from exc
        return {n: result.as_numpy(n) for n in names}

    def describe(self) -> str:
        return f"triton {self.url} models={','.join(f'{g}={n}' for g, n in sorted(self.model_names.items()))} version={self.version}"

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                try:
                    client.close()
                except Exception:  # noqa: BLE001 - closing best effort
                    pass
            self._clients.clear()


def make_backend(config: EncoderConfig, manifest: Manifest, model_dir: Path) -> Backend:
    if config.backend == "triton":
        return TritonBackend(
            manifest,
            model_dir,
            url=config.triton_url,
            ssl=config.triton_ssl,
            root_cert=config.triton_root_cert,
            model_names=config.triton_models,
            timeout_s=config.triton_timeout_s,
        )
    return OnnxRuntimeBackend(
        manifest,
        model_dir,
        precision=config.precision,
        graph_precision=config.graph_precision,
        providers=config.providers,
        provider_options=config.provider_options,
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        spinning=config.ort_spinning,
    )
