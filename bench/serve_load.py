#!/usr/bin/env python3
"""Load `smee-relay serve` as an attacker and a heavy user would (BENCHMARKS.md, "serve").

Usage: bench/serve_load.py BINARY memory [--max-memory 64MiB]
       bench/serve_load.py BINARY loris
       bench/serve_load.py fanout HOST:PORT[,HOST:PORT...] [EVENTS]   (any smee-shaped server)

memory: 10,000 channels x 3 events of 32 KiB, with one subscriber that never reads; prints the
        server's peak RSS (VmHWM) against --max-memory, and what /metrics says.
loris:  800 connections that send a request head a byte at a time; a normal post and a
        subscription meanwhile must be served within 1 s; then the slow ones must be gone.
fanout: 1,000 subscribers on one channel, then EVENTS (default 200) posts one after another;
        posts/s until every subscriber has every event, and p50/p99 post-to-receive latency.
        With several addresses (`serve --nats-url` replicas), subscribers are spread over them
        round robin and every post goes to the first.
Standard library only; everything on 127.0.0.1.
"""
import asyncio
import os
import re
import socket
import subprocess
import sys
import time

EVICTED = 'smee_relay_serve_evicted_events_total{reason="memory"}'
LAGGING = 'smee_relay_serve_shed_connections_total{reason="lagging_subscriber"}'
TIMEOUT = 'smee_relay_serve_shed_connections_total{reason="read_timeout"}'


def start(binary, *flags):
    proc = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0", *flags],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"},
    )
    for line in proc.stderr:
        m = re.search(r"addr=(127\.0\.0\.1:\d+)", line)
        if m:
            host, port = m.group(1).split(":")
            return proc, (host, int(port))
    raise SystemExit("serve did not start")


def status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


async def request(addr, head, body=b""):
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(head + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    return data


async def metrics(addr):
    data = await request(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = {}
    for line in data.decode().splitlines():
        if line and not line.startswith(("#", "HTTP", " ")) and " " in line:
            name, value = line.rsplit(" ", 1)
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


async def poster(addr, jobs, body):
    reader, writer = await asyncio.open_connection(*addr)
    while jobs:
        channel = jobs.pop()
        writer.write(
            f"POST /{channel} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            print("post refused:", head.split(b"\r\n")[0].decode(), file=sys.stderr)
    writer.close()


async def memory(binary, limit):
    proc, addr = start(binary, "--max-memory", limit, "--max-channels", "10000")
    base = status(proc.pid, "VmRSS")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(addr)
    stalled.sendall(b"GET /ch0 HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    body = b'{"pad":"' + b"x" * (32 * 1024 - 10) + b'"}'
    jobs = [f"ch{i % 10000}" for i in range(30000)][::-1]
    start_time = time.monotonic()
    await asyncio.gather(*(poster(addr, jobs, body) for _ in range(16)))
    took = time.monotonic() - start_time
    m = await metrics(addr)
    peak = status(proc.pid, "VmHWM")
    proc.terminate()
    proc.wait()
    mib = 1 << 20
    print(f"memory: --max-memory {limit}: 30,000 posts of 32 KiB to 10,000 channels in {took:.1f} s, "
          f"1 stalled subscriber")
    print(f"  RSS before load {base / mib:.1f} MiB, peak RSS {peak / mib:.1f} MiB")
    print(f"  /metrics: bytes_held {m.get('smee_relay_serve_bytes_held', 0) / mib:.1f} MiB, "
          f"evicted(memory) {m.get(EVICTED, 0):.0f}, "
          f"lagging cut {m.get(LAGGING, 0):.0f}, "
          f"channels {m.get('smee_relay_serve_channels', 0):.0f}")


async def loris(binary):
    proc, addr = start(binary)
    fds_before = len(os.listdir(f"/proc/{proc.pid}/fd"))
    slow = []
    for _ in range(800):
        s = socket.socket()
        s.connect(addr)
        s.sendall(b"POST /loris HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    # Let the server accept them all, then keep them dribbling.
    t0 = time.monotonic()
    post = await request(addr, b"POST /normal HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n", b"{}")
    post_took = time.monotonic() - t0
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"GET /normal HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    await writer.drain()
    got = b""
    while b"event: ready" not in got:
        got += await reader.read(4096)
    sub_took = time.monotonic() - t0
    fds_during = len(os.listdir(f"/proc/{proc.pid}/fd"))
    for s in slow:
        try:
            s.sendall(b"X")
        except OSError:
            pass
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        if fds <= fds_before + 2:
            break
        await asyncio.sleep(0.2)
    gone_after = time.monotonic() - t0
    m = await metrics(addr)
    writer.close()
    proc.terminate()
    proc.wait()
    print(f"loris: 800 slow heads; normal post {'200' if post.startswith(b'HTTP/1.1 200') else post[:12]} "
          f"in {post_took * 1000:.0f} ms, subscription ready in {sub_took * 1000:.0f} ms")
    print(f"  server fds: {fds_before} before, {fds_during} during, {fds} after {gone_after:.1f} s; "
          f"shed read_timeout {m.get(TIMEOUT, 0):.0f}")


async def subscriber(addr, path, events, got, ready):
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    buffer = b""
    readied = False
    count = 0
    while count < events:
        chunk = await reader.read(65536)
        if not chunk:
            raise SystemExit("a subscription ended")
        now = time.monotonic()
        buffer += chunk
        if not readied and b"ready" in buffer:
            readied = True
            ready.release()
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            m = re.search(rb'"seq":(\d+)', line)
            if line.startswith(b"data:") and m:
                got.append((int(m.group(1)), now))
                count += 1
    writer.close()


async def fanout(addrs, events):
    addr = addrs[0]
    path = "/fanout" + str(int(time.time()))
    got = []
    ready = asyncio.Semaphore(0)
    tasks = []
    for n in range(1000):
        tasks.append(asyncio.create_task(subscriber(addrs[n % len(addrs)], path, events, got, ready)))
    for _ in range(1000):
        await asyncio.wait_for(ready.acquire(), 60)
    sent = {}
    reader, writer = await asyncio.open_connection(*addr)
    start_time = time.monotonic()
    for seq in range(events):
        body = b'{"seq":%d,"pad":"%s"}' % (seq, b"x" * 1000)
        sent[seq] = time.monotonic()
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head, re.I)
        if m:
            await reader.readexactly(int(m.group(1)))
        else:  # chunked
            while True:
                size = int((await reader.readline()).strip(), 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
    await asyncio.wait_for(asyncio.gather(*tasks), 600)
    took = max(t for _, t in got) - start_time
    latencies = sorted((t - sent[seq]) * 1000 for seq, t in got)
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]
    print(f"fanout: {events} posts x 1,000 subscribers on {len(addrs)} server(s): {len(got)} deliveries in {took:.2f} s, "
          f"{events / took:.0f} posts/s fully delivered, latency p50 {p(0.5):.1f} ms, p99 {p(0.99):.1f} ms")


def main():
    if sys.argv[1] == "fanout":
        addrs = [(h, int(p)) for h, p in (a.split(":") for a in sys.argv[2].split(","))]
        events = int(sys.argv[3]) if len(sys.argv) > 3 else 200
        asyncio.run(fanout(addrs, events))
        return
    binary, what = sys.argv[1], sys.argv[2]
    if what == "memory":
        limit = sys.argv[4] if len(sys.argv) > 4 and sys.argv[3] == "--max-memory" else "256MiB"
        asyncio.run(memory(binary, limit))
    else:
        asyncio.run(loris(binary))


if __name__ == "__main__":
    main()
