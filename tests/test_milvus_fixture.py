"""The Milvus standalone test fixture: a second server starts while one runs (as in two test runs at
once on one machine), each on its own ports, the embedded etcd's included (it used to take the fixed
2379/2380 and crash the second server); a segment size asked for lands in the server's config."""

from __future__ import annotations

import pytest

from demo.milvus_standalone import MilvusStandalone

pytest.importorskip("milvus")


@pytest.mark.slow  # two Milvus standalone servers
def test_two_standalone_servers_run_side_by_side(tmp_path):
    servers = [MilvusStandalone(tmp_path / "a")]
    try:
        servers.append(MilvusStandalone(tmp_path / "b", segment_max_mb=1024))
        from pymilvus import MilvusClient

        assert servers[0].uri != servers[1].uri
        segment_sizes = []
        for server in servers:
            client = MilvusClient(uri=server.uri, timeout=10)
            assert isinstance(client.list_collections(), list)
            client.close()
            config = (server.base_dir / "configs" / "milvus.yaml").read_text()
            assert f"path: {server.base_dir / 'embedded-etcd.yaml'}" in config
            segment_sizes.append(config.split("  segment:\n    maxSize: ")[1].split()[0])
        assert segment_sizes == ["512", "1024"]  # the package's default, and the one asked for
        peers = [(s.base_dir / "embedded-etcd.yaml").read_text().split("listen-peer-urls: ")[1].split()[0] for s in servers]
        assert peers[0] != peers[1] and not any(p.endswith(":2380") for p in peers)
    finally:
        for server in servers:
            server.stop()


def test_a_server_that_dies_while_starting_fails_at_once(tmp_path):
    """A crashed binary is reported with its exit code, not after the whole start timeout."""
    from types import SimpleNamespace

    fixture = MilvusStandalone.__new__(MilvusStandalone)
    fixture.server = SimpleNamespace(server_proc=SimpleNamespace(poll=lambda: 139))
    fixture.uri, fixture.base_dir = "http://127.0.0.1:1", tmp_path
    with pytest.raises(RuntimeError, match=r"exited with code 139 while starting \(logs under "):
        fixture._wait_usable(timeout=3600)
