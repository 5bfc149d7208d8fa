"""The Milvus standalone server of the PyPI `milvus` package, on loopback ports chosen free: start,
SIGKILL (a crash), restart on the same data, stop. For the benchmarks and tests that need a real
Milvus server rather than milvus-lite; the `milvus` package is imported when a server starts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path


class MilvusStandalone:
    """The Milvus standalone binary shipped by the PyPI `milvus` package, on loopback ports chosen free.

    Stopped with the package's stop() (SIGTERM, then SIGKILL after 1 s); the process group is killed
    as a last resort."""

    def __init__(self, base_dir: Path, start_timeout_s: float = 120.0, segment_max_mb: int | None = None):
        """`segment_max_mb`: the size at which sealed segments stop growing (dataCoord.segment.maxSize; None: the
        package's 512 MB). Every search visits every segment, so a large collection answers faster from fewer,
        larger ones (Milvus 2.4 and later default to 1024 MB)."""
        from milvus import MilvusServer, MilvusServerConfig

        # The embedded etcd would listen on its fixed default ports (client 2379, peer 2380), so a
        # second server on this machine (another test run) would crash: give it free ones, through
        # an etcd config file (Milvus's etcd.config.path, a key the package's template lacks).
        client_port, peer_port = free_ports(2)
        self.server = MilvusServer(MilvusServerConfig(etcd_port=client_port), wait_for_started=False)
        self.server.set_base_dir(str(base_dir))
        self.base_dir = base_dir
        etcd_config = base_dir / "embedded-etcd.yaml"
        etcd_config.write_text(
            "name: default\n"
            f"listen-client-urls: http://127.0.0.1:{client_port}\n"
            f"advertise-client-urls: http://127.0.0.1:{client_port}\n"
            f"listen-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-advertise-peer-urls: http://127.0.0.1:{peer_port}\n"
            f"initial-cluster: default=http://127.0.0.1:{peer_port}\n"
        )
        template = self.server.config.template_text
        anchor = "  use:\n    embed: true"
        if anchor not in template:
            raise RuntimeError("the milvus package's config template changed: update MilvusStandalone")
        template = template.replace(anchor, f"  config:\n    path: {etcd_config}\n{anchor}", 1)
        if segment_max_mb is not None:
            line = "    maxSize: 512 # Maximum size of a segment in MB"
            if line not in template:
                raise RuntimeError("the milvus package's config template changed: update MilvusStandalone (segment maxSize)")
            template = template.replace(line, f"    maxSize: {int(segment_max_mb)} # Maximum size of a segment in MB", 1)
        self.server.config.template_text = template
        self.server.start()
        self.pid = self.server.server_proc.pid
        try:
            self.server.wait_started(timeout=int(start_timeout_s * 1000))
        except BaseException:
            self.stop()
            raise
        self.uri = f"http://127.0.0.1:{self.server.listen_port}"
        self._wait_usable(start_timeout_s)

    def _wait_usable(self, timeout: float) -> None:
        from pymilvus import MilvusClient

        end = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < end:
            code = self.server.server_proc.poll()
            if code is not None:  # it died (e.g. a port taken meanwhile): say so now, not after the timeout
                raise RuntimeError(f"Milvus standalone exited with code {code} while starting (logs under {self.base_dir})")
            try:
                client = MilvusClient(uri=self.uri, timeout=10)
                client.list_collections()
                client.close()
                return
            except Exception as exc:  # noqa: BLE001 - still starting
                last = exc
                time.sleep(0.5)
        raise TimeoutError(f"Milvus standalone at {self.uri} not usable after {timeout}s: {last}")

    def kill(self) -> None:
        """SIGKILL the server (a crash); its data stays for restart()."""
        self.server.server_proc.kill()
        self.server.server_proc.wait(30)
        self.server.server_proc = None

    def restart(self, timeout_s: float = 120.0) -> None:
        """Start the binary again on the same data and ports (after kill())."""
        # The package re-checks its ports by binding them without SO_REUSEADDR, which fails while the
        # killed server's connections sit in TIME_WAIT; its config file is already written: keep it.
        resolve, self.server.config.resolve = self.server.config.resolve, lambda: None
        try:
            self.server.start()
        finally:
            self.server.config.resolve = resolve
        self.pid = self.server.server_proc.pid
        self.server.wait_started(timeout=int(timeout_s * 1000))
        if f"http://127.0.0.1:{self.server.listen_port}" != self.uri:
            raise RuntimeError("the restarted Milvus server took other ports")
        self._wait_usable(timeout_s)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.stop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(self.pid, 0)
            os.kill(self.pid, signal.SIGKILL)  # last resort: the binary survived stop()


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on loopback right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def drop_collections(uri: str, prefix: str) -> None:
    """Drop the search service's collections under `prefix` (best effort)."""
    from pymilvus import MilvusClient

    with contextlib.suppress(Exception):
        client = MilvusClient(uri=uri, timeout=30)
        for name in (f"{prefix}_images", f"{prefix}_captions", f"{prefix}_meta", f"{prefix}_filter_check"):
            if client.has_collection(name):
                client.drop_collection(name)
        client.close()
