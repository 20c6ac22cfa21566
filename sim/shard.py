"""One shard of the world: a process serving the judge and a slice of the proxies.

Internal (`python -m sim --serve`), started by world.SimWorld. Protocol with the parent:
it sends one JSON line on stdin (the shard's spec), the shard binds every listener and
answers one JSON line on stdout (`ready`, pid, ports that had to move), then serves until
SIGTERM/SIGINT, until its stdin closes, or until its parent is gone, so that no shard
outlives the process that started it, even one killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import logging
import os
import random
import resource
import signal
import socket
import sys
import threading

import uvloop

from sim.fleet import PlannedProxy
from sim.judge import JudgeConnection
from sim.proxy_server import ProxyConnection

log = logging.getLogger(__name__)

JUDGE_BACKLOG = 4096
PROXY_BACKLOG = 128
PARENT_POLL_S = 0.5


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit: thousands of listeners and held connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def proxy_listener(proxy: PlannedProxy) -> socket.socket:
    """Bind the planned port; if something holds it (a wildcard listener), take a free one."""
    try:
        return listener(proxy.host, proxy.port)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        log.warning("port %s:%s in use, moving to a free port", proxy.host, proxy.port)
        return listener(proxy.host, 0)


async def serve(spec: dict) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    parent = os.getppid()

    def watch_stdin() -> None:  # EOF: the parent closed our stdin or died
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, name="stdin-watch", daemon=True).start()

    judge_sock = listener(spec["judge_host"], spec["judge_port"], reuse_port=True)
    servers = [await loop.create_server(JudgeConnection, sock=judge_sock, backlog=JUDGE_BACKLOG)]
    rng = random.Random(f"{spec['seed']}:{spec['shard']}")
    moved: dict[int, int] = {}
    for raw in spec["proxies"]:
        proxy = PlannedProxy.from_json(raw)
        sock = proxy_listener(proxy)
        port = sock.getsockname()[1]
        if port != proxy.port:
            moved[proxy.index] = port
        factory = functools.partial(ProxyConnection, proxy, rng)
        servers.append(await loop.create_server(factory, sock=sock, backlog=PROXY_BACKLOG))
    ready = {"ready": True, "shard": spec["shard"], "pid": os.getpid(), "moved": moved}
    if spec.get("api"):  # the backfill API (one shard only: its rate window is process state)
        from sim.api import API_HOST, ApiConfig, start_api

        api_config = ApiConfig.from_json(spec["api"])
        api_server, _ = await start_api(api_config, listener(API_HOST, api_config.port))
        servers.append(api_server)
        ready["api_port"] = api_server.sockets[0].getsockname()[1]
    sys.stdout.write(json.dumps(ready) + "\n")
    sys.stdout.flush()
    log.info("shard %s ready: %d proxies", spec["shard"], len(spec["proxies"]))

    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), PARENT_POLL_S)
        except TimeoutError:
            if os.getppid() != parent:
                log.warning("shard %s: parent %s is gone, exiting", spec["shard"], parent)
                break
    for server in servers:
        server.close()


def main() -> int:
    """Entry point of `python -m sim --serve`: spec on stdin, one ready line on stdout."""
    logging.basicConfig(
        level=logging.WARNING, format="sim-shard[%(process)d] %(levelname)s %(message)s"
    )
    line = sys.stdin.buffer.readline()
    if not line:
        log.error("no shard spec on stdin (this mode is started by sim.world.SimWorld)")
        return 2
    spec = json.loads(line)
    raise_nofile_limit()
    uvloop.run(serve(spec))
    # Thousands of half-open relays need no goodbye; skip interpreter teardown and its
    # stdin-watch thread.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
