#!/usr/bin/env python3
"""A byte pipe in front of a channel server that drops the raw opt-in, so every subscriber gets
smee.io's frame shape (`{...headers, body, query, timestamp}`, body re-serialised) even from a
`smee-relay serve` too old to have `--smee-wire`. bench/run.sh uses it with BENCH_WIRE_PROXY=1,
for every client alike (so each pays the same extra hop).

Usage: bench/smee_wire_proxy.py UPSTREAM_HOST:PORT   (prints its own port, then serves)
Standard library only; 127.0.0.1 only.
"""
import asyncio
import sys

UPSTREAM = sys.argv[1].split(":")


async def pipe(reader, writer):
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def handle(client_reader, client_writer):
    try:
        head = await client_reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        client_writer.close()
        return
    lines = head.split(b"\r\n")
    first = lines[0].replace(b"?raw=1", b"").replace(b"&raw=1", b"")
    kept = [first] + [l for l in lines[1:] if not l.lower().startswith(b"x-smee-relay-raw:")]
    up_reader, up_writer = await asyncio.open_connection(UPSTREAM[0], int(UPSTREAM[1]))
    up_writer.write(b"\r\n".join(kept))
    await asyncio.gather(pipe(client_reader, up_writer), pipe(up_reader, client_writer))


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
