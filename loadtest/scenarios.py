"""Locust users that wrap the typed gRPC clients and fire locust request events (request_type "grpc")."""

from __future__ import annotations

import io
import itertools
import random
import time
import uuid

import numpy as np
from locust import User, constant, task
from PIL import Image

from encoder_service.client import EncoderClient
from search_service.client import SearchClient

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


class GrpcUser(User):
    """Base user: `call(name, fn, *args)` times one client call and fires a locust request event."""

    abstract = True
    wait_time = constant(0)
    encoder_address = "127.0.0.1:50051"
    search_address = "127.0.0.1:50052"
    timeout_s = 10.0
    batch = 4

    def call(self, name: str, fn, *args, **kwargs):
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
            context={},
        )
        if exception is not None:
            time.sleep(0.01)  # do not spin on an unreachable server
        return result


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
        self.call("EncodeCaptions", self.encoder.encode_captions, random.sample(CAPTIONS, self.batch))


class EncodeImagesUser(EncoderUser):
    abstract = True
    images = sample_images()

    @task
    def encode_images(self):
        self.call("EncodeImages", self.encoder.encode_images, [random.choice(self.images)])


class SearchCaptionsUser(SearchUser):
    abstract = True

    @task
    def search_caption(self):
        self.call("Search", self.search.search_caption, random.choice(CAPTIONS), top_k=5)


class MixedUser(SearchUser):
    """Index new captions (weight 1) while searching (weight 3)."""

    abstract = True
    counter = itertools.count()

    @task(1)
    def index(self):
        base = f"lt-{uuid.uuid4().hex[:8]}"
        captions = {f"{base}-{i}": random.choice(CAPTIONS) for i in range(self.batch)}
        self.call("Index", self.search.index_captions, captions, {k: {"source": "loadtest"} for k in captions})

    @task(3)
    def search_caption(self):
        self.call("Search", self.search.search_caption, random.choice(CAPTIONS), top_k=5)


SCENARIOS = {
    "encode-captions": EncodeCaptionsUser,
    "encode-images": EncodeImagesUser,
    "search": SearchCaptionsUser,
    "mixed": MixedUser,
}
