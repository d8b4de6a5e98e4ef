"""Worker "hosts" for the multi-host acceptance tests: Linux network namespaces.

Each host is a network namespace of this test run with its loopback and one veth link to
the root namespace, on a /30 of 10.231.0.0/16: the root side of host N's link is its
gateway, the namespace side its address, and the link is the host's only way out. The
services the tests use listen on the root namespace's loopback, which another namespace
cannot reach; so for each host and each service a TCP relay in the test process listens
on that host's gateway and forwards to the service. A worker started in the namespace
(``ip netns exec``) with URLs from :meth:`Host.url` reaches PostgreSQL and the broker
over its own link, and nothing else.

A partition is a drop rule on the host's side of its link, for one service's relay port:
a u32 filter steers those packets into an htb class whose queue holds none (pfifo
``limit 0``), so each is dropped silently, as a broken network drops it; the host's other
traffic, and the relay itself, are untouched. This needs the htb, fifo and u32 schedulers
only: no tc action module and no netfilter tools.

Namespace names carry the test process's pid (``cc-<pid>-<token>-h<N>``); at start-up,
namespaces of that pattern whose process is gone are removed with what still runs in
them. Subnets are picked under a file lock among those no address or route of the machine
already overlaps, so parallel runs get different ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import pytest

#: The range the test hosts' links take their /30s from; nothing else is ever addressed.
NETWORK = ipaddress.IPv4Network("10.231.0.0/16")
#: The namespaces of this module: cc-<pid of the test process>-<token>-h<N>.
NAME = re.compile(r"^cc-(\d+)-[0-9a-f]+-h\d+$")
LOCK = "/run/lock/celery-causal-netns.lock"
DEFAULT_PORTS = {"postgresql": 5432, "postgres": 5432, "redis": 6379, "amqp": 5672}
#: The class the partition's filter steers packets into, and the empty queue under it.
_DROP_CLASS, _DROP_QUEUE, _FILTER_PRIO = "1:1", "10:", "1"
_RATE, _EMPTY = ("htb", "rate", "1mbit"), ("pfifo", "limit", "0")


def unavailable(reason: str) -> NoReturn:
    """Skip loudly, or fail under CI=true, where this machine cannot build the hosts."""
    message = f"the multi-host tests cannot build their hosts: {reason}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(f"SKIPPED, NO NETWORK NAMESPACES: {message}")


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def endpoint(url: str) -> tuple[str, int]:
    """The (host, port) a service URL connects to."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    port = parts.port or DEFAULT_PORTS.get(scheme)
    if parts.hostname is None or port is None:
        raise ValueError(f"no host and port in {url!r}")
    return parts.hostname, port


@dataclass
class Host:
    """One worker host: a namespace, its link, and a relay port per service."""

    name: str
    netns: str
    #: The root side of the link, where this host's relays listen.
    gateway: str
    address: str
    relay: Relay
    #: Service endpoint -> the port its relay listens on at ``gateway``.
    ports: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def launcher(self) -> tuple[str, ...]:
        """Prefix of a command to run on this host (it execs the command)."""
        return ("ip", "netns", "exec", self.netns)

    def url(self, url: str) -> str:
        """``url`` as this host reaches it: through its link, to the service's relay."""
        parts = urlsplit(url)
        port = self.ports[endpoint(url)]
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}{self.gateway}:{port}"))

    def partition(self, url: str) -> None:
        """Drop every packet this host sends to ``url``'s service, until :meth:`heal`."""
        _run(
            *("tc", "-n", self.netns, "filter", "add", "dev", "eth0", "parent", "1:"),
            *("protocol", "ip", "prio", _FILTER_PRIO, "u32"),
            *("match", "ip", "dst", f"{self.gateway}/32"),
            *("match", "ip", "dport", str(self.ports[endpoint(url)]), "0xffff"),
            *("flowid", _DROP_CLASS),
        )

    def heal(self) -> None:
        _run("tc", "-n", self.netns, "filter", "del", "dev", "eth0", "parent", "1:")

    def dropped(self) -> int:
        """Packets the partition dropped so far on this host."""
        out = _run("tc", "-n", self.netns, "-s", "-j", "qdisc", "show", "dev", "eth0")
        (queue,) = [q for q in json.loads(out) if q.get("handle") == _DROP_QUEUE]
        return int(queue["drops"])

    def pids(self) -> list[int]:
        """The processes running in this host's namespace."""
        return [int(p) for p in _run("ip", "netns", "pids", self.netns).split()]


class Relay:
    """TCP relays in the root namespace, served by one asyncio loop in a daemon thread.

    Each connection to a listening port is paired with one to the service; bytes go both
    ways unchanged, an end-of-stream is passed on (the other side sees the FIN it would
    have seen without the relay: a killed worker's broker connection ends, and the broker
    requeues its unacked messages), and a reset closes both.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netns-relay")
        self._thread.daemon = True
        self._thread.start()

    def listen(self, address: str, upstream: tuple[str, int]) -> int:
        """Relay connections to ``address`` (on a port the kernel picks) to ``upstream``."""
        coro = self._listen(address, upstream)
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _listen(self, address: str, upstream: tuple[str, int]) -> int:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(reader, writer, upstream)

        server = await asyncio.start_server(serve, address, 0)
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: tuple[str, int]
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        writers = [writer]
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream)
            writers.append(up_writer)
            await asyncio.gather(
                self._pipe(reader, up_writer, writers),
                self._pipe(up_reader, writer, writers),
            )
        except OSError:
            pass  # the service refused: the client sees its connection closed
        finally:
            for w in writers:
                w.transport.abort()
            self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        both: list[asyncio.StreamWriter],
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
            if not writer.is_closing():
                writer.write_eof()
        except OSError:  # one side reset: neither direction has anything left to carry
            for w in both:
                w.transport.abort()

    def close(self) -> None:
        async def shut() -> None:
            for server in self._servers:
                server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for server in self._servers:
                await server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()


def _remove_stale() -> None:
    """Remove namespaces of this pattern whose test process is gone, and what runs there
    (workers of a test run that was killed). Best effort: one that will not go is left."""
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.strip() else ""
        match = NAME.match(name)
        if match is not None and not _alive(int(match.group(1))):
            with contextlib.suppress(RuntimeError):
                _kill_all_in(name)
                _run("ip", "netns", "del", name)


def _kill_all_in(netns: str) -> None:
    for pid in _run("ip", "netns", "pids", netns).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    used = [
        ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}").network
        for link in json.loads(_run("ip", "-j", "-4", "addr", "show"))
        for a in link.get("addr_info", [])
    ]
    for route in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all")):
        dst = route.get("dst", "default")
        if dst != "default":
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(dst, strict=False))
    return [n for n in used if isinstance(n, ipaddress.IPv4Network)]


def _free_block() -> ipaddress.IPv4Network:
    """A /24 of :data:`NETWORK` that no address or route of the machine overlaps."""
    used = _networks_in_use()
    for block in NETWORK.subnets(new_prefix=24):
        if not any(block.overlaps(n) for n in used):
            return block
    raise RuntimeError(f"every /24 of {NETWORK} is in use")


def _link(netns: str, device: str, gateway: str, address: str) -> None:
    """Give the namespace its loopback and its link, ready for a partition."""
    # Both ends in one request: the peer is born inside the namespace, as its eth0.
    _run("ip", "link", "add", device, "type", "veth", "peer", "name", "eth0", "netns", netns)
    _run("ip", "addr", "add", f"{gateway}/30", "dev", device)
    _run("ip", "link", "set", device, "up")
    _run("ip", "-n", netns, "addr", "add", f"{address}/30", "dev", "eth0")
    _run("ip", "-n", netns, "link", "set", "eth0", "up")
    _run("ip", "-n", netns, "link", "set", "lo", "up")
    # Unclassified packets leave directly (htb's "default 0"); the partition's filter
    # steers its packets into a class whose queue holds none.
    tc = ("tc", "-n", netns)
    _run(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "0")
    _run(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", _DROP_CLASS, *_RATE)
    _run(*tc, "qdisc", "add", "dev", "eth0", "parent", _DROP_CLASS, "handle", _DROP_QUEUE, *_EMPTY)


def _delete(netns: str, device: str) -> None:
    """Kill what still runs in the namespace, then delete its link and the namespace.

    The link is deleted first because that is synchronous: a deleted namespace takes its
    link with it only once the kernel has released it."""
    with contextlib.suppress(RuntimeError):
        _kill_all_in(netns)
    with contextlib.suppress(RuntimeError):  # never created, when the namespace's set-up failed
        _run("ip", "link", "del", device)
    _run("ip", "netns", "del", netns)


@contextlib.contextmanager
def hosts(count: int, services: Iterable[str]) -> Iterator[list[Host]]:
    """``count`` hosts, each with a relay to each of the ``services`` (URLs).

    Skips (fails under CI=true) where the machine cannot build them; tears everything down
    on the way out, however the test ended.
    """
    if os.geteuid() != 0:
        unavailable("creating them takes root (CI runs as root)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            unavailable(f"`{tool}` is not installed (Debian: apt-get install iproute2)")
    upstreams = sorted({endpoint(url) for url in services})
    token = secrets.token_hex(3)
    relay = Relay()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(relay.close)
        made: list[Host] = []
        try:
            os.makedirs(os.path.dirname(LOCK), exist_ok=True)
            with open(LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released on close
                _remove_stale()
                block = _free_block()
                for n in range(1, count + 1):
                    netns = f"cc-{os.getpid()}-{token}-h{n}"
                    gateway, address = block[4 * n + 1], block[4 * n + 2]
                    device = f"cc{token}h{n}"
                    _run("ip", "netns", "add", netns)
                    cleanup.callback(_delete, netns, device)
                    _link(netns, device, str(gateway), str(address))
                    made.append(Host(f"h{n}", netns, str(gateway), str(address), relay))
        except RuntimeError as exc:
            unavailable(str(exc))
        for host in made:
            for upstream in upstreams:
                host.ports[upstream] = relay.listen(host.gateway, upstream)
        yield made
