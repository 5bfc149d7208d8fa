"""Locust users that wrap the typed gRPC clients and fire locust request events (request_type "grpc")."""

from __future__ import annotations

import io
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from locust import User, constant, task
from locust.user.users import LOCUST_STATE_STOPPING
from PIL import Image

from teran_api.encoder_client import EncoderClient
from teran_api.search_client import SearchClient

CAPTIONS = [
    "a dog runs on the beach",
    "two children play football in a park",
    "a man rides a bicycle down the street",
    "a woman in a red dress holds an umbrella",
    "a black cat sleeps on a sofa",
    "people walk along a snowy mountain path",
    "a boy jumps into a swimming pool",
    "a brown horse grazes in a green field",
]


def sample_images(count: int = 4, width: int = 96, height: int = 72) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR).save(buffer, format="JPEG")
        images.append(buffer.getvalue())
    return images


@dataclass
class Samples:
    """Captions and encoded photos the users send; `source` says where they came from."""

    captions: list[str]
    images: list[bytes]
    source: str

    def describe(self) -> dict:
        return {"source": self.source, "captions": len(self.captions), "images": len(self.images)}


def load_samples(data_dir: str | Path | None = None, photos: int = 16, caption_photos: int = 100) -> Samples:
    """Real Flickr8k dev photos and captions (`data_dir`, else $TERAN_FLICKR8K_DIR, else ../shared/data/flickr8k):
    the captions of the first `caption_photos` dev photos and the JPEG files of the first `photos`.
    Falls back to the built-in captions and synthetic images when no such folder exists."""
    from teran.data.flickr8k import default_data_dir, load_split
    from teran.errors import TeranInputError

    root = Path(data_dir) if data_dir else default_data_dir()
    try:
        split = load_split("dev", root, limit=max(photos, caption_photos))
    except TeranInputError:
        if data_dir:  # asked for explicitly: do not silently fall back
            raise
        return Samples(list(CAPTIONS), sample_images(), "built-in")
    captions = [c for caps in split.captions[:caption_photos] for c in caps]
    images = [split.image_path(i).read_bytes() for i in range(min(photos, len(split.names)))]
    return Samples(captions, images, f"flickr8k dev split: {root.resolve()}")


def error_code(exception: BaseException | None) -> str | None:
    """The gRPC status name of a client error (SearchError / EncoderError carry `.code`), else the exception type."""
    if exception is None:
        return None
    code = getattr(exception, "code", None)
    return getattr(code, "name", None) or type(exception).__name__


class GrpcUser(User):
    """Base user: `call(name, fn, *args)` times one client call and fires a locust request event."""

    abstract = True
    wait_time = constant(0)
    encoder_address = "127.0.0.1:50051"
    search_address = "127.0.0.1:50052"
    timeout_s = 10.0
    batch = 4
    captions: list[str] = CAPTIONS
    images: list[bytes] = sample_images()  # the runner sets real photos where it has them

    def call(self, name: str, fn, *args, **kwargs):
        """Run one client call; returns (result, exception) and reports it to locust (context: its status code)."""
        start = time.perf_counter()
        exception = None
        result = None
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported to locust as a failure
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=0,
            exception=exception,
            context={"code": error_code(exception) or "OK"},
        )
        if exception is not None:
            time.sleep(0.01)  # do not spin on an unreachable server
        return result, exception


class EncoderUser(GrpcUser):
    abstract = True

    def on_start(self):
        self.encoder = EncoderClient(self.encoder_address, timeout=self.timeout_s)

    def on_stop(self):
        self.encoder.close()


class SearchUser(GrpcUser):
    abstract = True

    def on_start(self):
        self.search = SearchClient(self.search_address, timeout=self.timeout_s)

    def on_stop(self):
        self.search.close()


class EncodeCaptionsUser(EncoderUser):
    abstract = True

    @task
    def encode_captions(self):
        self.call("EncodeCaptions", self.encoder.encode_captions, random.sample(self.captions, self.batch))


class EncodeImagesUser(EncoderUser):
    abstract = True

    @task
    def encode_images(self):
        self.call("EncodeImages", self.encoder.encode_images, [random.choice(self.images)])


class SearchCaptionsUser(SearchUser):
    abstract = True

    @task
    def search_caption(self):
        self.call("Search", self.search.search_caption, random.choice(self.captions), top_k=5)


class MixedUser(SearchUser):
    """Index new captions (weight 1) while searching (weight 3)."""

    abstract = True

    def new_captions(self) -> dict[str, str]:
        base = f"lt-{uuid.uuid4().hex[:12]}"
        return {f"{base}-{i}": random.choice(self.captions) for i in range(self.batch)}

    @task(1)
    def index(self):
        captions = self.new_captions()
        self.call("Index", self.search.index_captions, captions, {k: {"source": "loadtest"} for k in captions})

    @task(3)
    def search_caption(self):
        self.call("Search", self.search.search_caption, random.choice(self.captions), top_k=5)


RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED"})


class FaultMixedUser(MixedUser):
    """The mixed workload for the fault run: an Index that fails with a retryable code is retried with
    the same ids (Index is an idempotent upsert) until acknowledged; every acknowledged id goes into
    `acked` (a list shared by all users of the run, set by the runner) and is checked with Get afterwards."""

    abstract = True
    acked: list[str] = []
    gave_up: list[str] = []  # ids of Index calls that failed with a non-retryable code
    max_attempts = 200

    @task(1)
    def index(self):
        captions = self.new_captions()
        metadata = {k: {"source": "loadtest"} for k in captions}
        for _ in range(self.max_attempts):
            _, exception = self.call("Index", self.search.index_captions, captions, metadata)
            if exception is None:
                self.acked.extend(captions)
                return
            if error_code(exception) not in RETRYABLE:
                break
            if self._state == LOCUST_STATE_STOPPING:  # the run is over: not acknowledged, so not checked either
                return
            time.sleep(0.1)
        self.gave_up.extend(captions)


SCENARIOS = {
    "encode-captions": EncodeCaptionsUser,
    "encode-images": EncodeImagesUser,
    "search": SearchCaptionsUser,
    "mixed": MixedUser,
}
