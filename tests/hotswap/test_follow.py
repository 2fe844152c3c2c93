"""A host on a running registry: following a tag (a move swaps within the poll interval, a bad
adapter is reported and changes nothing, switching back comes from the LRU); failed pulls
back off exponentially (a 404, e.g. a deleted blob, is final for that digest); stop() cuts a
long poll short; a pulled layer altered on disk is refused; a swap still loading when the
host is detached changes nothing; a multitask prompt is followed serving one task."""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest
import torch
from peft import MultitaskPromptTuningConfig, PeftModel

from peftreg import Client
from peftreg.hotswap import (
    AdapterDigestMismatch,
    AdapterHost,
    HostConfig,
    HostError,
    RankTooLarge,
    SwapEvent,
    SwapFailure,
)
from peftreg.registry.storage.filesystem import blob_path
from peftreg.sdk.errors import NotFound, PeftregError
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.fixtures.server import RegistryProcess
from tests.hotswap.builders import MAX_DIFF, lora, model_outputs, peft_outputs, save_adapter

TARGETS = ["q_proj", "v_proj"]
POLL = 3.0
TENSORS = "adapter_model.safetensors"


class CountingTransport(httpx.BaseTransport):
    """The real HTTP transport, recording every request sent (and, when `hold` is given,
    holding blob downloads until `release` is set)."""

    def __init__(self, hold: bool = False) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[httpx.Request] = []
        self.hold = hold
        self.reached = threading.Event()
        self.release = threading.Event()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        if self.hold and "/blobs/" in request.url.path:
            self.reached.set()
            assert self.release.wait(30)
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()

    def downloads(self) -> list[str]:
        return [
            r.url.path for r in self.sent if "/manifests/" in r.url.path or "/blobs/" in r.url.path
        ]

    def watching(self, known: str) -> bool:
        """A long poll that passed `known` as the tag's digest was sent."""
        return any(
            r.url.path.endswith("/watch")
            and parse_qs(r.url.query.decode()).get("digest") == [known]
            for r in list(self.sent)
        )


def wait_until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _tag(client: Client, source: str, target: str) -> None:
    manifest = client.get_manifest(source)
    client.put_manifest(target, manifest.content, manifest.media_type)


def _push(client: Client, path: Path, reference: str) -> tuple[str, str]:
    """(manifest digest, tensors layer digest)."""
    result = client.push(path, reference)
    layer = next(f for f in result.files if f.title == TENSORS)
    return str(result.digest), str(layer.digest)


def test_follow_a_tag(server: RegistryProcess, tmp_path: Path) -> None:
    ids = sample_ids()
    paths = {
        "v1": save_adapter(tiny_llama, lora(TARGETS, r=4), tmp_path / "v1", seed=1),
        "v2": save_adapter(tiny_llama, lora(TARGETS, r=8), tmp_path / "v2", seed=2),
        "v3": save_adapter(tiny_llama, lora(["q_proj"], r=16), tmp_path / "v3", seed=3),
    }
    with Client(server.url, cache=tmp_path / "publisher-cache") as publisher:
        digests = {
            tag: str(publisher.push(path, f"acme/bot:{tag}").digest) for tag, path in paths.items()
        }
        _tag(publisher, "acme/bot:v1", "acme/bot:prod")
        transport = CountingTransport()
        client = Client(server.url, transport=transport, cache=tmp_path / "cache")
        model = tiny_llama()
        host = AdapterHost(model, HostConfig(targets=TARGETS, max_rank=8), client=client)
        swaps: queue.Queue[SwapEvent] = queue.Queue()
        failures: queue.Queue[SwapFailure] = queue.Queue()
        follower = host.follow(
            client, "acme/bot:prod", on_swap=swaps.put, on_error=failures.put, poll_timeout=POLL
        )
        try:
            assert swaps.get(timeout=30).digest == digests["v1"]  # the initial sync
            want = peft_outputs(tiny_llama, paths["v1"], ids)
            assert (model_outputs(model, ids) - want).abs().max().item() <= MAX_DIFF

            moved = time.monotonic()
            _tag(publisher, "acme/bot:v2", "acme/bot:prod")
            event = swaps.get(timeout=30)
            assert time.monotonic() - moved < POLL
            assert event.previous == digests["v1"]
            assert event.digest == digests["v2"]
            assert host.active_digest == digests["v2"]
            want = peft_outputs(tiny_llama, paths["v2"], ids)
            v2_logits = model_outputs(model, ids)
            assert (v2_logits - want).abs().max().item() <= MAX_DIFF

            _tag(publisher, "acme/bot:v3", "acme/bot:prod")  # rank 16 > max_rank 8
            failure = failures.get(timeout=30)
            assert isinstance(failure.error, RankTooLarge)
            assert failure.active == digests["v2"]
            assert host.active_digest == digests["v2"]
            assert torch.equal(model_outputs(model, ids), v2_logits)

            downloads = len(transport.downloads())
            _tag(publisher, "acme/bot:v1", "acme/bot:prod")
            back = swaps.get(timeout=30)
            assert back.digest == digests["v1"]
            assert back.cached
            assert len(transport.downloads()) == downloads  # from the LRU: nothing fetched
            assert swaps.empty()
            assert failures.empty()
        finally:
            follower.stop()
            client.close()
        assert not follower.running
        assert follower.swaps == 3
        assert follower.errors == 1

        # By digest, the second swap to the same adapter sends no request at all.
        sent = len(transport.sent)
        assert host.swap(f"acme/bot@{digests['v2']}").cached
        assert len(transport.sent) == sent
        # v3 failed its plan, so it never entered the cache (nothing good was evicted for it).
        assert host.cache.digests() == [digests["v1"], digests["v2"]]
        host.detach()


def test_failed_pulls_back_off_and_a_404_is_final(server: RegistryProcess, tmp_path: Path) -> None:
    repo = "acme/flaky"
    paths = [
        save_adapter(tiny_llama, lora(TARGETS, r=4), tmp_path / f"a{i}", seed=20 + i)
        for i in range(3)
    ]
    with Client(server.url, cache=tmp_path / "publisher-cache") as publisher:
        pushed = [_push(publisher, path, f"{repo}:v{i}") for i, path in enumerate(paths)]
        _tag(publisher, f"{repo}:v0", f"{repo}:prod")
    transport = CountingTransport()
    # No retries inside the SDK: the follower's own backoff is what is measured.
    client = Client(server.url, transport=transport, cache=tmp_path / "cache", retries=0)
    host = AdapterHost(tiny_llama(), HostConfig(targets=TARGETS), client=client)
    swaps: queue.Queue[SwapEvent] = queue.Queue()
    failures: queue.Queue[tuple[float, SwapFailure]] = queue.Queue()
    follower = host.follow(
        client,
        f"{repo}:prod",
        on_swap=swaps.put,
        on_error=lambda failure: failures.put((time.monotonic(), failure)),
        poll_timeout=POLL,
        min_backoff=0.1,
        max_backoff=5.0,
    )
    try:
        assert swaps.get(timeout=30).digest == pushed[0][0]

        # The store cannot read v1's tensors blob (a directory stands where the file was):
        # the registry answers 500, and the follower retries, backing off.
        stored = blob_path(server.home / "storage", _parse(pushed[1][1]))  # type: ignore[arg-type]
        os.remove(stored)
        stored.mkdir()
        with Client(server.url) as publisher:
            _tag(publisher, f"{repo}:v1", f"{repo}:prod")
        times = []
        for _ in range(5):
            seen, failure = failures.get(timeout=30)
            assert isinstance(failure.error, PeftregError)
            assert failure.error.status not in (401, 403, 404)
            times.append(seen)
        intervals = [b - a for a, b in itertools.pairwise(times)]
        for index, interval in enumerate(intervals):  # 0.1, 0.2, 0.4, 0.8 s at least
            assert interval >= 0.1 * 2**index * 0.95, intervals
        assert host.active_digest == pushed[0][0]

        # v2's tensors blob is deleted from the store: 404, reported once, not retried.
        os.remove(blob_path(server.home / "storage", _parse(pushed[2][1])))  # type: ignore[arg-type]
        with Client(server.url) as publisher:
            _tag(publisher, f"{repo}:v2", f"{repo}:prod")
        while True:
            _seen, failure = failures.get(timeout=30)
            if isinstance(failure.error, NotFound):  # (one retry of v1 may come first)
                break
        assert isinstance(failure.error, NotFound)
        wait_until(lambda: transport.watching(pushed[2][0]))  # waiting for the next move
        assert failures.empty()
        assert follower.known == pushed[2][0]
        assert host.active_digest == pushed[0][0]

        # stop() cuts the long poll (30 s) short.
        stopped = time.monotonic()
        follower.stop(timeout=10)
        assert not follower.running
        assert time.monotonic() - stopped < 2.0
    finally:
        follower.stop()
        host.detach()
        client.close()


def _parse(digest: str) -> object:
    from peftreg.digest import Digest

    return Digest.parse(digest)


def test_a_pulled_layer_altered_on_disk_is_refused(server: RegistryProcess, tmp_path: Path) -> None:
    good = save_adapter(tiny_llama, lora(TARGETS, r=4), tmp_path / "good", seed=31)
    other = save_adapter(tiny_llama, lora(TARGETS, r=4), tmp_path / "other", seed=32)
    ids = sample_ids()
    with Client(server.url, cache=tmp_path / "cache") as client:
        _push(client, good, "acme/tamper:good")
        _manifest, layer = _push(client, other, "acme/tamper:other")
        client.pull("acme/tamper:other")  # into the local cache
        cached = client.cache.blob_path(_parse(layer))  # type: ignore[arg-type]
        os.chmod(cached, 0o644)
        data = bytearray(cached.read_bytes())
        data[-1] ^= 0x01  # same size, one bit of the last tensor value flipped
        cached.write_bytes(bytes(data))
        model = tiny_llama()
        with AdapterHost(model, HostConfig(targets=TARGETS), client=client) as host:
            host.swap("acme/tamper:good")
            before = model_outputs(model, ids)
            with pytest.raises(AdapterDigestMismatch, match="does not match its manifest"):
                host.swap("acme/tamper:other")  # an LRU miss: the cached blob is read
            assert torch.equal(model_outputs(model, ids), before)
            assert len(host.cache) == 1


def test_a_swap_loading_during_detach_changes_nothing(
    server: RegistryProcess, tmp_path: Path
) -> None:
    path = save_adapter(tiny_llama, lora(TARGETS, r=4), tmp_path / "a", seed=41)
    with Client(server.url, cache=tmp_path / "publisher-cache") as publisher:
        _push(publisher, path, "acme/race:v1")
    transport = CountingTransport(hold=True)
    model = tiny_llama()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    errors: list[BaseException] = []
    with Client(server.url, transport=transport, cache=tmp_path / "cache") as client:
        host = AdapterHost(model, HostConfig(targets=TARGETS, mode="merged"), client=client)

        def swap() -> None:
            try:
                host.swap("acme/race:v1")
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=swap)
        worker.start()
        try:
            assert transport.reached.wait(30)  # the swap is downloading the adapter
            host.detach()
        finally:
            transport.release.set()
            worker.join(30)
    assert len(errors) == 1
    assert isinstance(errors[0], HostError)
    assert "detached" in str(errors[0])
    assert host.active_digest is None
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_follow_a_multitask_prompt_serving_one_task(
    server: RegistryProcess, tmp_path: Path
) -> None:
    config = MultitaskPromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, num_tasks=2)
    path = save_adapter(tiny_llama, config, tmp_path / "mpt")
    with Client(server.url, cache=tmp_path / "publisher-cache") as publisher:
        digest = str(publisher.push(path, "acme/tasks:v1").digest)
        _tag(publisher, "acme/tasks:v1", "acme/tasks:prod")
    model = tiny_llama()
    host = AdapterHost(model, HostConfig(targets=TARGETS, max_virtual_tokens=4))
    swaps: queue.Queue[SwapEvent] = queue.Queue()
    with Client(server.url, cache=tmp_path / "cache") as client, host:
        follower = host.follow(client, "acme/tasks:prod", on_swap=swaps.put, task_id=1)
        try:
            event = swaps.get(timeout=30)
        finally:
            follower.stop()
        assert (event.digest, event.task_id, host.active_task) == (digest, 1, 1)
        reference = PeftModel.from_pretrained(tiny_llama(), str(path)).eval()
        ids = sample_ids()
        want = model_outputs(reference, ids, task_ids=torch.tensor([1, 1]))[:, 4:]
        assert (model_outputs(model, ids)[:, 4:] - want).abs().max().item() <= MAX_DIFF
