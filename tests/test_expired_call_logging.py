"""Callers that give up mid-call leave no ERROR in the log; a real failed send still does.

A caller whose deadline passes while the gateway sends (a stream's chunk, or
Generate's answer) used to get a grpc ERROR traceback ("ExecuteBatchError
raised in core by servicer method"), a few per thousand such calls and one
in twenty when the deadline falls right on a send. Neither that nor a caller
cancelling mid-stream is an error. A send that fails for the gateway's own
reason (an answer over server.max_send_message_bytes) still is.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Iterator

import grpc
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config
from tests.conftest import request


class Recorded(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]


@pytest.fixture
def grpc_log() -> Iterator[Recorded]:
    handler, logger = Recorded(), logging.getLogger("grpc")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


async def test_callers_giving_up_mid_call_log_no_error_but_oversized_sends_do(
    grpc_log: Recorded,
) -> None:
    config = load_config(
        environ={},
        overrides={
            "server.port": 0,
            "http.enabled": False,
            "auth.enabled": False,
            "ledger.enabled": False,
            "logging.calls": False,
            "server.max_send_message_bytes": 4096,
        },
    )
    gateway = Gateway(config)
    port = await gateway.start()
    outcomes: collections.Counter[str] = collections.Counter()
    deadline_s = 0.020
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GenerationServiceStub(channel)

            async def expiring(method: str) -> None:
                # The one word's chunk (and so Generate's answer) is due right
                # when the caller's deadline passes.
                req = request("hello")
                req.provider_options.update({"chunk_delay_ms": random.uniform(19.0, 20.5)})
                try:
                    if method == "Generate":
                        await stub.Generate(req, timeout=deadline_s)
                    else:
                        async for _ in stub.StreamGenerate(req, timeout=deadline_s):
                            pass
                    outcomes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    outcomes[err.code().name] += 1

            async def cancelling() -> None:
                req = request(" ".join(f"w{i}" for i in range(200)))
                req.provider_options.update({"chunk_delay_ms": 0.2})
                stream = stub.StreamGenerate(req)
                await stream.read()
                await asyncio.sleep(random.uniform(0, 0.02))
                stream.cancel()
                outcomes["cancelled"] += 1

            for _ in range(100):
                await asyncio.gather(
                    *(expiring("Generate") for _ in range(10)),
                    *(expiring("StreamGenerate") for _ in range(10)),
                    *(cancelling() for _ in range(5)),
                )
            await asyncio.sleep(0.2)
            # The calls did give up mid-call, hundreds of times.
            assert outcomes["DEADLINE_EXCEEDED"] >= 1000, outcomes
            assert grpc_log.errors() == []

            # An answer over the send limit is the gateway's failure: still an ERROR.
            with pytest.raises(grpc.aio.AioRpcError) as oversized:
                await stub.Generate(request("x " * 5000), timeout=10)
            assert oversized.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await asyncio.sleep(0.2)
            assert any("ExecuteBatchError" in message for message in grpc_log.errors())
    finally:
        await gateway.stop(grace=1)
