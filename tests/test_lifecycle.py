"""Health checking, the health-check command, and graceful shutdown of a real process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgateway.v1 import generation_pb2 as pb
from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config
from tests.conftest import (
    REPO_ROOT,
    RunningGateway,
    free_port,
    request,
    start_server_process,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def read_rest(stream: grpc.aio.UnaryStreamCall) -> list[pb.StreamGenerateResponse]:
    """Reads a stream to its end with read() (iteration may not follow a read())."""
    events = []
    while (event := await stream.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


@pytest.mark.parametrize("service", ["", "llmgateway.v1.GenerationService"])
async def test_health_check_overall_and_per_service(running: RunningGateway, service: str) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    response = await health.Check(health_pb2.HealthCheckRequest(service=service))
    assert response.status == SERVING


async def test_health_check_unknown_service(running: RunningGateway) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_sees_not_serving_when_draining() -> None:
    gateway = Gateway(load_config(environ={}, overrides={"server.port": 0, "http.port": 0}))
    port = await gateway.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(gateway.stop(grace=30))
        assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
        # No generation call is in flight, so the drain does not wait out the
        # 30 s grace period for the open Watch stream (10 s: room for a busy CI).
        await asyncio.wait_for(stopping, 10)


async def test_healthcheck_command(running: RunningGateway) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.healthcheck",
        "--address",
        running.address,
        stdout=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert out.decode().strip() == "SERVING"

    failing = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server.healthcheck",
        "--address",
        "127.0.0.1:1",
        "--timeout",
        "0.5",
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    _, err = await failing.communicate()
    assert failing.returncode == 1
    assert b"unhealthy: UNAVAILABLE" in err


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_sigterm_lets_an_open_stream_finish_then_exits_zero(event_loop: str) -> None:
    server = await start_server_process(
        env={
            "LLMGW_SERVER__SHUTDOWN_GRACE_S": "10",
            "LLMGW_LOGGING__LEVEL": "INFO",
            "LLMGW_SERVER__EVENT_LOOP": event_loop,
        }
    )
    assert f"(event loop: {event_loop})" in server.log[-1]
    address = f"127.0.0.1:{server.port}"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        req = request(" ".join(f"w{i}" for i in range(20)))  # 20 chunks, 50 ms apart: ~1 s
        req.provider_options.update({"chunk_delay_ms": 50})
        stream = stub.StreamGenerate(req)
        first = await stream.read()
        assert first.HasField("message_start")

        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        # Once draining, new calls are refused...
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(request(), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # ...while the open stream runs to its end.
        events = [first, *await read_rest(stream)]
        assert events[-1].HasField("message_stop")
        text = "".join(
            e.content_block_delta.text for e in events if e.HasField("content_block_delta")
        )
        assert text == " ".join(f"w{i}" for i in range(20))
        assert await stream.code() == grpc.StatusCode.OK

    assert await asyncio.wait_for(server.process.wait(), 10) == 0
    assert server.process.stderr is not None
    log = "".join(server.log) + (await server.process.stderr.read()).decode()
    assert "SIGTERM received" in log
    assert "stopped" in log


async def test_sigterm_the_moment_it_serves_still_drains_and_exits_zero() -> None:
    # The signal handlers are in place before the port opens: a SIGTERM sent as
    # soon as the log says "serving on" (a supervisor's quick restart) drains.
    server = await start_server_process()
    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.process.wait(), 15) == 0
    assert server.process.stderr is not None
    assert "stopped" in (await server.process.stderr.read()).decode()


async def test_grace_period_bounds_a_stream_that_would_run_longer() -> None:
    server = await start_server_process(env={"LLMGW_SERVER__SHUTDOWN_GRACE_S": "0.5"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        req = request(" ".join(f"w{i}" for i in range(100)))  # ~10 s at 100 ms a chunk
        req.provider_options.update({"chunk_delay_ms": 100})
        stream = stub.StreamGenerate(req)
        await stream.read()
        loop = asyncio.get_running_loop()
        started = loop.time()
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await read_rest(stream)
        assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert await asyncio.wait_for(server.process.wait(), 10) == 0
    assert loop.time() - started < 5


async def test_invalid_config_stops_start_up_naming_the_key(tmp_path: object) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        env={"LLMGW_SERVER__PORT": "not-a-port", "PATH": ""},
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert b"server.port" in err
    assert b"Traceback" not in err


async def test_a_port_another_program_holds_stops_start_up_with_a_message() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "server",
            "--port",
            str(port),
            env={**os.environ, "LLMGW_AUTH__ENABLED": "false"},
            stderr=asyncio.subprocess.PIPE,
            cwd=REPO_ROOT,
        )
        _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port} (server.host, server.port)".encode() in err
    assert b"Traceback" not in err


def test_stream_request_shape_is_shared() -> None:
    """StreamGenerate takes GenerateRequest, so callers switch RPCs without rebuilding."""
    service = pb.DESCRIPTOR.services_by_name["GenerationService"]
    methods = {m.name: m for m in service.methods}
    assert methods["StreamGenerate"].input_type is methods["Generate"].input_type
    assert methods["StreamGenerate"].server_streaming


async def test_two_workers_share_a_port_and_drain_together() -> None:
    port = free_port()
    server = await start_server_process("--port", str(port), "--workers", "2")
    assert server.port == port
    assert server.process.stderr is not None
    log = list(server.log)
    # Both workers report serving on the same port.
    async with asyncio.timeout(20):
        while sum(f"serving on 127.0.0.1:{port}" in line for line in log) < 2:
            log.append((await server.process.stderr.readline()).decode())

    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(12)]
    try:
        replies = await asyncio.gather(
            *(
                pb_grpc.GenerationServiceStub(c).Generate(request("hi"), timeout=10)
                for c in channels
            )
        )
    finally:
        for channel in channels:
            await channel.close()
    assert all(r.content[0].text == "hi" for r in replies)

    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.process.wait(), 15) == 0
    rest = (await server.process.stderr.read()).decode()
    assert rest.count("stopped") == 2, rest


async def test_workers_need_a_fixed_port() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "--port",
        "0",
        "--workers",
        "2",
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 2
    assert b"server" in err
    assert b"fixed port" in err
