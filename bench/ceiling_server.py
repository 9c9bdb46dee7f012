"""The ceiling: a bare grpc.aio server with canned answers.

It implements GenerationService with a prebuilt GenerateResponse and a
prebuilt 20-chunk event stream, so it measures what grpc.aio alone costs
per call and per message here: no validation, no routing, no providers.
The most any Python gRPC service can do on this machine: on uvloop, as the
gateway serves by default (server.event_loop: auto).

With INTERVAL_MS, each stream's chunks follow a fixed timeline that far
apart (the held-streams scenario's reference: grpc.aio alone, holding as
many streams as the gateway is asked to).

Usage: python bench/ceiling_server.py PORT [CHUNKS [INTERVAL_MS]]
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvloop

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc


def canned_events(chunks: int) -> list[pb.StreamGenerateResponse]:
    events = [
        pb.StreamGenerateResponse(
            message_start=pb.MessageStart(id="msg_ceiling", model="echo", provider="ceiling")
        ),
        pb.StreamGenerateResponse(
            content_block_start=pb.ContentBlockStart(
                index=0, content_block=pb.ContentBlock(text="")
            )
        ),
    ]
    events += [
        pb.StreamGenerateResponse(content_block_delta=pb.ContentBlockDelta(index=0, text=f" w{i}"))
        for i in range(chunks)
    ]
    events += [
        pb.StreamGenerateResponse(content_block_stop=pb.ContentBlockStop(index=0)),
        pb.StreamGenerateResponse(
            message_delta=pb.MessageDelta(
                stop_reason=pb.STOP_REASON_END_TURN,
                usage=pb.Usage(input_tokens=20, output_tokens=chunks),
            )
        ),
        pb.StreamGenerateResponse(message_stop=pb.MessageStop()),
    ]
    return events


class CeilingServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, chunks: int, interval_s: float = 0.0) -> None:
        self._events = canned_events(chunks)
        self._interval = interval_s
        self._response = pb.GenerateResponse(
            id="msg_ceiling",
            model="echo",
            provider="ceiling",
            content=[pb.ContentBlock(text="".join(f" w{i}" for i in range(chunks)))],
            stop_reason=pb.STOP_REASON_END_TURN,
            usage=pb.Usage(input_tokens=20, output_tokens=chunks),
        )

    async def Generate(self, request: Any, context: Any) -> pb.GenerateResponse:
        return self._response

    async def StreamGenerate(
        self, request: Any, context: Any
    ) -> AsyncIterator[pb.StreamGenerateResponse]:
        if not self._interval:
            for event in self._events:
                yield event
            return
        loop = asyncio.get_running_loop()
        due = loop.time()
        for event in self._events:
            if event.HasField("content_block_delta"):
                due += self._interval
                await asyncio.sleep(due - loop.time())
            yield event


async def main(port: int, chunks: int, interval_ms: float = 0.0) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = CeilingServicer(chunks, interval_ms / 1000)
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"ceiling serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        chunks = int(sys.argv[2]) if len(sys.argv) > 2 else 20
        runner.run(main(int(sys.argv[1]), chunks, float(sys.argv[3]) if len(sys.argv) > 3 else 0))
