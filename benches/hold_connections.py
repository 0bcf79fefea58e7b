#!/usr/bin/env python3
"""Open N TLS 1.3 connections to a server and hold them idle (helper of benches/memory.sh).

    hold_connections.py --port PORT --ca CA.crt --proto h1|h2 [-n 5000] [--concurrency 100]

Every connection is a new TCP connection with a full TLS 1.3 handshake (no session reuse),
SNI and certificate verification for "localhost", and ALPN offering only the protocol asked for
(which the server must select). Then:
  h1: one keep-alive "GET / HTTP/1.1" whose whole response is read, so the connection is idle
      past its first request;
  h2: the client preface and an empty SETTINGS frame; the server's SETTINGS frame is read and
      acknowledged, and the server's ACK of ours is awaited, so the server has set up its
      HTTP/2 state for the connection.
When all attempts are done the client prints one line on stdout,
    READY <established> <failed> <seconds> [first error]
and holds the established connections idle until a line arrives on stdin (or stdin closes),
then closes them all and prints "CLOSED <n>". Exit status 0 even with failures (the caller
checks the counts).
"""

import argparse
import asyncio
import resource
import ssl
import sys
import time

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
H2_SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"


async def h1_request(reader, writer):
    writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: hold_connections\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise RuntimeError(f"unexpected status line {lines[0]!r}")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        if name.strip().lower() == "connection" and "close" in value.lower():
            raise RuntimeError("server answered Connection: close")
    if length is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(length)


async def h2_setup(reader, writer):
    writer.write(H2_PREFACE + H2_EMPTY_SETTINGS)
    await writer.drain()
    got_settings = got_ack = False
    while not (got_settings and got_ack):
        header = await reader.readexactly(9)
        length = int.from_bytes(header[0:3], "big")
        ftype, flags = header[3], header[4]
        if length:
            await reader.readexactly(length)
        if ftype == 0x4:  # SETTINGS
            if flags & 0x1:
                got_ack = True
            else:
                got_settings = True
                writer.write(H2_SETTINGS_ACK)
                await writer.drain()
        elif ftype == 0x7:  # GOAWAY
            raise RuntimeError("server sent GOAWAY")


async def open_one(args, ctx, alpn, held, errors, sem):
    async with sem:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    args.host, args.port, ssl=ctx, server_hostname="localhost"
                ),
                args.timeout,
            )
            sslobj = writer.get_extra_info("ssl_object")
            if sslobj.version() != "TLSv1.3":
                raise RuntimeError(f"negotiated {sslobj.version()}")
            if sslobj.session_reused:
                raise RuntimeError("session reused")
            if sslobj.selected_alpn_protocol() != alpn:
                raise RuntimeError(f"ALPN {sslobj.selected_alpn_protocol()!r}, wanted {alpn!r}")
            if args.proto == "h1":
                await asyncio.wait_for(h1_request(reader, writer), args.timeout)
            else:
                await asyncio.wait_for(h2_setup(reader, writer), args.timeout)
            held.append((reader, writer))
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            errors.append(f"{type(e).__name__}: {e}")
            if writer is not None:
                writer.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--proto", choices=["h1", "h2"], required=True)
    p.add_argument("-n", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--timeout", type=float, default=20.0)
    args = p.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.n + 200
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(want, soft), hard), hard))

    alpn = "http/1.1" if args.proto == "h1" else "h2"
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([alpn])

    held, errors = [], []
    sem = asyncio.Semaphore(args.concurrency)
    t0 = time.monotonic()
    await asyncio.gather(*(open_one(args, ctx, alpn, held, errors, sem) for _ in range(args.n)))
    took = time.monotonic() - t0
    first = f" {errors[0]}" if errors else ""
    print(f"READY {len(held)} {len(errors)} {took:.1f}{first}", flush=True)

    # Hold: the connections stay idle (nothing is read or written) until told to close.
    # A server closing one meanwhile is not noticed here; the caller counts established
    # connections on the server side.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.5)
    print(f"CLOSED {len(held)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
