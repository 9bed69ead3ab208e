"""The harness's readiness wait for a server process it started on a port it chose: a port
picked free can be taken by another server (the other test worker's) before the process
binds it; then the process exits ("port in use") and the other server answers `/readyz`.
The wait counts an answer only from a port the process itself listens on."""

import asyncio
import subprocess
import sys

import pytest

from starters.ports import free_port
from tests.harness import wait_until_ready


async def answer_ready(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    await writer.drain()
    writer.close()


async def test_a_ready_answer_from_another_process_on_the_port_is_not_ours() -> None:
    port = free_port()
    foreign = await asyncio.start_server(answer_ready, "127.0.0.1", port)
    # ours never binds the port (as one that found it taken) and exits a moment later
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        with pytest.raises(AssertionError, match="exited"):
            await wait_until_ready(f"http://127.0.0.1:{port}", ours)
    finally:
        foreign.close()
        await foreign.wait_closed()
        ours.kill()
        ours.wait()


async def test_a_ready_answer_from_the_process_on_its_port_is_ready() -> None:
    port = free_port()
    server = ("import asyncio\n"
              "async def answer(r, w):\n"
              "    await r.readuntil(b'\\r\\n\\r\\n')\n"
              "    w.write(b'HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok')\n"
              "    await w.drain(); w.close()\n"
              "async def main():\n"
              f"    async with await asyncio.start_server(answer, '127.0.0.1', {port}) as s:\n"
              "        await s.serve_forever()\n"
              "asyncio.run(main())\n")
    ours = subprocess.Popen([sys.executable, "-c", server])
    try:
        await wait_until_ready(f"http://127.0.0.1:{port}", ours)
        assert ours.poll() is None
    finally:
        ours.kill()
        ours.wait()
