"""Following a tag on a running registry: a move swaps within the poll interval, a bad
adapter is reported and changes nothing, and switching back comes from the LRU (no network)."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import httpx
import torch

from client import Client
from client.hotswap import AdapterHost, HostConfig, RankTooLarge, SwapEvent, SwapFailure
from tests.adapters.tiny_models import sample_ids, tiny_llama
from tests.fixtures.server import RegistryProcess
from tests.hotswap.builders import MAX_DIFF, lora, model_outputs, peft_outputs, save_adapter

TARGETS = ["q_proj", "v_proj"]
POLL = 3.0


class CountingTransport(httpx.BaseTransport):
    """The real HTTP transport, recording (method, path) of every request sent."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()

    def downloads(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p in self.sent if "/manifests/" in p or "/blobs/" in p]


def _tag(client: Client, source: str, target: str) -> None:
    manifest = client.get_manifest(source)
    client.put_manifest(target, manifest.content, manifest.media_type)


def test_follow_a_tag(registry_server: RegistryProcess, tmp_path: Path) -> None:
    ids = sample_ids()
    paths = {
        "v1": save_adapter(tiny_llama, lora(TARGETS, r=4), tmp_path / "v1", seed=1),
        "v2": save_adapter(tiny_llama, lora(TARGETS, r=8), tmp_path / "v2", seed=2),
        "v3": save_adapter(tiny_llama, lora(["q_proj"], r=16), tmp_path / "v3", seed=3),
    }
    with Client(registry_server.url, cache=tmp_path / "publisher-cache") as publisher:
        digests = {
            tag: str(publisher.push(path, f"acme/bot:{tag}").digest) for tag, path in paths.items()
        }
        _tag(publisher, "acme/bot:v1", "acme/bot:prod")
        transport = CountingTransport()
        client = Client(registry_server.url, transport=transport, cache=tmp_path / "cache")
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
        assert host.cache.digests() == [digests["v3"], digests["v1"], digests["v2"]]
        host.detach()
