"""What shutdown records: calls the drain cuts, a second signal, an unusable ledger path.

A call still in flight when the drain's grace runs out is cancelled by the
gateway and its caller sees UNAVAILABLE: its row says UNAVAILABLE
(SHUTTING_DOWN), on either edge. A second SIGTERM exits within two seconds,
without waiting for the drain, but with the rows of every call served so far
and of the calls it cut. A ledger path SQLite cannot use stops start-up with
a message naming `ledger.path`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

import grpc
import httpx2
import pytest

from llmgateway.v1 import generation_pb2_grpc as pb_grpc
from server.app import Gateway
from server.config import load_config
from tests.conftest import REPO_ROOT, request, start_server_process


def ledger_rows(path: Path) -> dict[str, tuple[str, str]]:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT request_id, status, error_reason FROM usage").fetchall()
    finally:
        conn.close()
    assert len(rows) == len({r[0] for r in rows}), "a call was recorded twice"
    return {r[0]: (r[1], r[2]) for r in rows}


SLOW_OFFLINE = {"offline": {"type": "offline", "chunk_delay_ms": 100}}
SLOW_TEXT = " ".join(f"w{i}" for i in range(100))  # ~10 s at 100 ms a chunk


async def test_calls_cut_by_the_drain_are_recorded_unavailable_on_both_edges(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.sqlite3"
    config = load_config(
        environ={},
        overrides={
            "server.host": "127.0.0.1",
            "server.port": 0,
            "http.port": 0,
            "auth.enabled": False,
            "providers": SLOW_OFFLINE,
            "ledger.path": str(path),
        },
    )
    gateway = Gateway(config)
    port = await gateway.start()
    body = {
        "model": "echo",
        "max_tokens": 500,
        "stream": True,
        "messages": [{"role": "user", "content": SLOW_TEXT}],
    }
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
        httpx2.AsyncClient(timeout=20) as client,
        client.stream(
            "POST",
            f"http://127.0.0.1:{gateway.http_port}/v1/messages",
            content=json.dumps(body),
            headers={"content-type": "application/json", "x-request-id": "http-cut"},
        ) as response,
    ):
        stream = pb_grpc.GenerationServiceStub(channel).StreamGenerate(
            request(SLOW_TEXT, request_id="grpc-cut")
        )
        assert (await stream.read()).HasField("message_start")
        chunks = response.aiter_bytes()
        assert b"message_start" in await anext(chunks)

        await gateway.stop(grace=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            while await stream.read() is not grpc.aio.EOF:
                pass
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        # The HTTP caller hears it too: the stream ends with an error event
        # (overloaded: retry elsewhere), not cut off mid-body.
        rest = b"".join([chunk async for chunk in chunks])
        assert b"event: error" in rest and b"overloaded_error" in rest
        assert b"message_stop" not in rest

    rows = ledger_rows(path)
    assert rows["grpc-cut"] == ("UNAVAILABLE", "SHUTTING_DOWN")
    assert rows["http-cut"] == ("UNAVAILABLE", "SHUTTING_DOWN")


async def test_a_second_sigterm_exits_at_once_with_every_row_written(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    server = await start_server_process(
        env={
            "LLMGW_LEDGER__PATH": str(path),
            # Only a flush at exit writes the rows of this test.
            "LLMGW_LEDGER__FLUSH_INTERVAL_S": "60",
            "LLMGW_SERVER__SHUTDOWN_GRACE_S": "30",
            "LLMGW_PROVIDERS": json.dumps(SLOW_OFFLINE),
            "LLMGW_LOGGING__CALLS": "false",
        }
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.GenerationServiceStub(channel)
        await asyncio.gather(*(stub.Generate(request("hi", request_id=f"ok{i}")) for i in range(5)))
        streams = [stub.StreamGenerate(request(SLOW_TEXT, request_id=f"cut{i}")) for i in range(3)]
        for stream in streams:
            assert (await stream.read()).HasField("message_start")

        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        assert server.process.returncode is None  # draining: the streams have 30 s
        loop = asyncio.get_running_loop()
        second = loop.time()
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 10) == 1
        assert loop.time() - second < 2.5
    rows = ledger_rows(path)
    assert {rid: rows.get(rid) for rid in (f"ok{i}" for i in range(5))} == {
        f"ok{i}": ("OK", "") for i in range(5)
    }
    assert {rid: rows.get(rid) for rid in (f"cut{i}" for i in range(3))} == {
        f"cut{i}": ("UNAVAILABLE", "SHUTTING_DOWN") for i in range(3)
    }


@pytest.mark.parametrize("unusable", ["a directory", "under a regular file"])
async def test_an_unusable_ledger_path_names_the_key_and_exits_2(
    tmp_path: Path, unusable: str
) -> None:
    if unusable == "a directory":
        path = tmp_path / "ledger"
        path.mkdir()
    else:
        (tmp_path / "file").write_text("not a folder")
        path = tmp_path / "file" / "usage.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "server",
        "--port",
        "0",
        env={
            **os.environ,
            "LLMGW_AUTH__ENABLED": "false",
            "LLMGW_HTTP__PORT": "0",
            "LLMGW_LEDGER__PATH": str(path),
        },
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2, err.decode()
    assert b"ledger.path" in err and str(path).encode() in err
    assert b"Traceback" not in err
