"""`python -m loadtest --start-local MODEL_DIR --encoder-precision int8` (issue 15): the option reaches the encoder."""

from __future__ import annotations

from loadtest import services
from loadtest.runner import command_line


def test_command_line_carries_the_encoder_precision():
    argv = command_line("encode-captions", "-", start_local="artifacts/m", encoder_precision="int8")
    assert argv[argv.index("--encoder-precision") + 1] == "int8"
    assert "--encoder-precision" not in command_line("encode-captions", "-", start_local="artifacts/m")


def test_start_local_passes_precision_to_the_encoder(tmp_path, monkeypatch):
    started = []

    class FakeService:
        def __init__(self, module, health, args, log):
            self.module, self.args, self.address = module, args, f"127.0.0.1:{len(started) + 1}"
            started.append(self)

        def start(self):
            pass

        def stop(self):
            pass

    monkeypatch.setattr(services, "LocalService", FakeService)
    (tmp_path / "manifest.json").write_text("{}")
    with services.start_local(tmp_path, tmp_path / "work", encoder_precision="int8") as (encoder, _search):
        assert encoder.args[encoder.args.index("--precision") + 1] == "int8"
    with services.start_local(tmp_path, tmp_path / "work2") as (encoder, _search):
        assert "--precision" not in encoder.args
