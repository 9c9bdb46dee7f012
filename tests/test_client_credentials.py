"""The client credential interceptors against a real gateway whose tokens live 2 seconds."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from clients import GatewayClientSync, UnauthenticatedError
from clients.credentials import IssueTokenBackoff, TokenSource
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.auth.tokens import TokenRejectedError, create_signing_key
from tests.conftest import request
from tests.test_auth import AuthedGateway, expect_code, start_authed_gateway

ISSUE_TOKEN = "/llmgateway.v1.TokenService/IssueToken"
GENERATE = "/llmgateway.v1.GenerationService/Generate"
STREAM = "/llmgateway.v1.GenerationService/StreamGenerate"


class CallCounter(grpc.aio.ServerInterceptor):
    """Counts every call that reaches the server, refused ones included.

    While `issue_token_down` is set, IssueToken answers UNAVAILABLE (an
    overloaded or restarting gateway).
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.issue_token_down = False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        self.calls[handler_call_details.method] += 1
        if self.issue_token_down and handler_call_details.method == ISSUE_TOKEN:
            return grpc.unary_unary_rpc_method_handler(_unavailable)
        return await continuation(handler_call_details)


async def _unavailable(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNAVAILABLE, "token service down")


@pytest.fixture(scope="module")
async def counter() -> CallCounter:
    return CallCounter()


@pytest.fixture(scope="module")
async def short_lived(
    tmp_path_factory: pytest.TempPathFactory, counter: CallCounter
) -> AsyncIterator[AuthedGateway]:
    running = await start_authed_gateway(
        tmp_path_factory.mktemp("client-auth"),
        interceptors=[counter],
        token_ttl_s=2,
        leeway_s=0,  # so a token used past its expiry really is refused
    )
    yield running
    await running.close()


@pytest.fixture
async def client(short_lived: AuthedGateway) -> AsyncIterator[tuple[TokenSource, Any]]:
    source = TokenSource(short_lived.address, short_lived.create_key("client")[1])
    async with grpc.aio.insecure_channel(
        short_lived.address, interceptors=source.interceptors()
    ) as channel:
        yield source, pb_grpc.GenerationServiceStub(channel)
    await source.aclose()


async def test_fifty_concurrent_calls_share_one_issue_token(
    client: tuple[TokenSource, Any], counter: CallCounter
) -> None:
    source, stub = client
    before = counter.calls[ISSUE_TOKEN]
    unary = [stub.Generate(request(f"call {i}")) for i in range(40)]
    streams = [_collect(stub.StreamGenerate(request(f"stream {i}"))) for i in range(10)]
    results = await asyncio.gather(*unary, *streams)
    assert [r.content[0].text for r in results[:40]] == [f"call {i}" for i in range(40)]
    assert all(events[-1].HasField("message_stop") for events in results[40:])
    assert counter.calls[ISSUE_TOKEN] - before == 1
    assert source.issued == 1


async def _collect(call: Any) -> list[Any]:
    return [event async for event in call]


async def test_two_second_tokens_keep_ten_seconds_of_calls_working(
    client: tuple[TokenSource, Any], counter: CallCounter
) -> None:
    source, stub = client
    before = counter.calls.copy()
    loop = asyncio.get_running_loop()
    end = loop.time() + 10
    unary = streamed = 0
    while loop.time() < end:
        await stub.Generate(request("tick"))
        unary += 1
        events = await _collect(stub.StreamGenerate(request("tock")))
        assert events[-1].HasField("message_stop")
        streamed += 1
        await asyncio.sleep(0.2)
    # Every call was accepted the first time: the token was always replaced
    # before it expired, never after a refusal.
    assert counter.calls[GENERATE] - before[GENERATE] == unary
    assert counter.calls[STREAM] - before[STREAM] == streamed
    assert 4 <= counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] <= 10
    assert source.issued == counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN]


async def test_a_stream_outlives_its_token(client: tuple[TokenSource, Any]) -> None:
    _, stub = client
    words = " ".join(f"w{i}" for i in range(30))
    req = request(words)
    req.provider_options.update({"chunk_delay_ms": 120})  # ~3.6 s, past the 2 s token
    events = await _collect(stub.StreamGenerate(req))
    text = "".join(e.content_block_delta.text for e in events if e.HasField("content_block_delta"))
    assert text == words


async def _invalidate_signing_keys(gateway: AuthedGateway) -> None:
    """Makes every token issued so far unknown to the gateway (a botched key rotation)."""
    directory = gateway.config.auth.signing_keys_dir
    for path in directory.glob("*.pem"):
        path.unlink()
    create_signing_key(directory)
    await gateway.gateway.auth.ring.reload()  # type: ignore[union-attr]


async def test_unauthenticated_refreshes_once_and_retries_once(
    short_lived: AuthedGateway, client: tuple[TokenSource, Any], counter: CallCounter
) -> None:
    _, stub = client
    await stub.Generate(request("warm up"))
    await _invalidate_signing_keys(short_lived)
    before = counter.calls.copy()
    assert (await stub.Generate(request("after"))).content[0].text == "after"
    assert counter.calls[GENERATE] - before[GENERATE] == 2  # refused, then retried
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1

    await _invalidate_signing_keys(short_lived)
    before = counter.calls.copy()
    events = await _collect(stub.StreamGenerate(request("stream after")))
    assert events[-1].HasField("message_stop")
    assert counter.calls[STREAM] - before[STREAM] == 2
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1


async def test_concurrent_refusals_share_one_refresh(
    short_lived: AuthedGateway, client: tuple[TokenSource, Any], counter: CallCounter
) -> None:
    _, stub = client
    await stub.Generate(request("warm up"))
    await _invalidate_signing_keys(short_lived)
    before = counter.calls.copy()
    await asyncio.gather(*(stub.Generate(request(str(i))) for i in range(20)))
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1
    assert counter.calls[GENERATE] - before[GENERATE] == 40


async def test_a_token_refused_again_is_not_retried_in_a_loop(
    short_lived: AuthedGateway,
    client: tuple[TokenSource, Any],
    counter: CallCounter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, stub = client
    await stub.Generate(request("warm up"))

    def refuse(token: str) -> Any:
        raise TokenRejectedError("test")

    monkeypatch.setattr(short_lived.gateway.auth.verifier, "verify", refuse)  # type: ignore[union-attr]
    before = counter.calls.copy()
    await expect_code(grpc.StatusCode.UNAUTHENTICATED, stub.Generate(request()))
    assert counter.calls[GENERATE] - before[GENERATE] == 2
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1

    before = counter.calls.copy()
    stream = stub.StreamGenerate(request())
    await expect_code(grpc.StatusCode.UNAUTHENTICATED, stream.read())
    assert await stream.code() == grpc.StatusCode.UNAUTHENTICATED
    assert counter.calls[STREAM] - before[STREAM] == 2
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1


async def test_a_revoked_key_fails_calls_cleanly(short_lived: AuthedGateway) -> None:
    key_id, key = short_lived.create_key("revoked")
    await short_lived.gateway.auth.store.revoke_async(key_id)  # type: ignore[union-attr]
    async with (
        TokenSource(short_lived.address, key) as source,
        grpc.aio.insecure_channel(short_lived.address, interceptors=source.interceptors()) as ch,
    ):
        stub = pb_grpc.GenerationServiceStub(ch)
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, stub.Generate(request()))
        await expect_code(grpc.StatusCode.UNAUTHENTICATED, _collect(stub.StreamGenerate(request())))


async def test_stream_errors_and_empty_streams_pass_through(
    client: tuple[TokenSource, Any],
) -> None:
    _, stub = client
    bad = request(model="no-such-model")
    stream = stub.StreamGenerate(bad)
    await expect_code(grpc.StatusCode.NOT_FOUND, stream.read())
    assert await stream.code() == grpc.StatusCode.NOT_FOUND
    events = []
    reader = stub.StreamGenerate(request("read me"))
    while (event := await reader.read()) is not grpc.aio.EOF:
        events.append(event)
    assert events[-1].HasField("message_stop")
    assert await reader.code() == grpc.StatusCode.OK


async def test_the_api_key_goes_only_to_issue_token(
    short_lived: AuthedGateway, client: tuple[TokenSource, Any]
) -> None:
    seen: list[tuple[str, str]] = []

    class Spy(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, details: Any, req: Any) -> Any:
            seen.extend((str(k), str(v)) for k, v in details.metadata or ())
            return await continuation(details, req)

    key = short_lived.create_key("spied")[1]
    async with TokenSource(short_lived.address, key) as source:
        channel = grpc.aio.insecure_channel(
            short_lived.address, interceptors=[*source.interceptors(), Spy()]
        )
        async with channel:
            await pb_grpc.GenerationServiceStub(channel).Generate(request())
    assert [v for k, v in seen if k == "authorization"]
    assert all(key not in v for _, v in seen)
    assert key not in repr(source)


def test_refresh_fraction_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="refresh_fraction"):
        TokenSource("localhost:1", "k", refresh_fraction=1.5)


async def _calls_for(seconds: float, stub: Any) -> tuple[Counter[grpc.StatusCode], str]:
    """Calls Generate and StreamGenerate in a loop, as a worker retrying would.

    Returns the status codes and the last error's message.
    """
    codes: Counter[grpc.StatusCode] = Counter()
    details = ""
    # One after the other: a call starts when made.
    calls: tuple[Callable[[], Awaitable[Any]], ...] = (
        lambda: stub.Generate(request()),
        lambda: _collect(stub.StreamGenerate(request())),
    )
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        for call in calls:
            try:
                await call()
                codes[grpc.StatusCode.OK] += 1
            except grpc.aio.AioRpcError as error:
                codes[error.code()] += 1
                details = error.details() or ""
        await asyncio.sleep(0.005)
    return codes, details


async def test_a_revoked_key_is_not_sent_again_and_again(
    short_lived: AuthedGateway, counter: CallCounter
) -> None:
    key_id, key = short_lived.create_key("revoked-before")
    await short_lived.gateway.auth.store.revoke_async(key_id)  # type: ignore[union-attr]
    before = counter.calls.copy()
    async with (
        TokenSource(short_lived.address, key) as source,
        grpc.aio.insecure_channel(short_lived.address, interceptors=source.interceptors()) as ch,
    ):
        codes, details = await _calls_for(2.0, pb_grpc.GenerationServiceStub(ch))
    assert codes[grpc.StatusCode.UNAUTHENTICATED] > 50 and set(codes) == {
        grpc.StatusCode.UNAUTHENTICATED
    }
    # One IssueToken said the key is revoked; nothing else reached the gateway.
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1
    assert counter.calls[GENERATE] - before[GENERATE] == 0
    assert counter.calls[STREAM] - before[STREAM] == 0
    assert "refused the API key" in details and "revoked" in details


async def test_a_key_revoked_while_in_use_stops_its_calls(
    short_lived: AuthedGateway, counter: CallCounter
) -> None:
    key_id, key = short_lived.create_key("revoked-during")
    async with (
        TokenSource(short_lived.address, key) as source,
        grpc.aio.insecure_channel(short_lived.address, interceptors=source.interceptors()) as ch,
    ):
        stub = pb_grpc.GenerationServiceStub(ch)
        await stub.Generate(request("before"))
        await short_lived.gateway.auth.store.revoke_async(key_id)  # type: ignore[union-attr]
        before = counter.calls.copy()
        codes, details = await _calls_for(2.0, stub)
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1
    # The call that found its token refused; after IssueToken refused the key,
    # no call reaches the gateway.
    assert counter.calls[GENERATE] - before[GENERATE] == 1
    assert counter.calls[STREAM] - before[STREAM] == 0
    assert "refused the API key" in details


async def test_issue_token_failures_back_off_exponentially(
    short_lived: AuthedGateway, counter: CallCounter
) -> None:
    key = short_lived.create_key("flaky")[1]
    before = counter.calls.copy()
    loop = asyncio.get_running_loop()
    counter.issue_token_down = True
    try:
        backoff = IssueTokenBackoff(clock=time.monotonic)
        async with TokenSource(short_lived.address, key, backoff=backoff) as source:
            end = loop.time() + 2.0
            failures = 0
            while loop.time() < end:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await source.token()
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                failures += 1
                await asyncio.sleep(0.005)
            asked = counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN]
            # Waits of at least 0.25, 0.5 and 1 s: four asks in two seconds at most.
            assert 2 <= asked <= 4 and failures > 100
            counter.issue_token_down = False
            assert backoff.failures == asked
            await asyncio.sleep(backoff.wait())
            assert await source.token()  # back: a token, and the backoff starts over
            assert backoff.failures == 0
    finally:
        counter.issue_token_down = False


async def test_the_sync_client_stops_asking_for_a_revoked_key(
    short_lived: AuthedGateway, counter: CallCounter
) -> None:
    key_id, key = short_lived.create_key("revoked-sync")
    await short_lived.gateway.auth.store.revoke_async(key_id)  # type: ignore[union-attr]
    before = counter.calls.copy()

    def calls() -> list[UnauthenticatedError]:
        refusals = []
        with GatewayClientSync(short_lived.address, api_key=key) as client:
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                with pytest.raises(UnauthenticatedError) as caught:
                    client.generate("echo", "Hi")
                refusals.append(caught.value)
                with pytest.raises(UnauthenticatedError):
                    client.stream("echo", "Hi").final_response()
        return refusals

    refusals = await asyncio.to_thread(calls)
    assert len(refusals) > 20
    assert counter.calls[ISSUE_TOKEN] - before[ISSUE_TOKEN] == 1
    assert counter.calls[GENERATE] - before[GENERATE] == 0
    assert all("revoked" in str(error) for error in refusals)
