"""HTTP API figures: transition commands per second with 2 uvicorn workers (p50/p99 latency),
and census latency with 100,000 active patients. PostgreSQL, the real `continuum serve`.

Run it directly (pytest does not collect it):

    .venv/bin/python tests/benchmarks/bench_api.py            # 100,000 patients, ~8 minutes
    .venv/bin/python tests/benchmarks/bench_api.py --quick    # 10,000 patients
    .venv/bin/python tests/benchmarks/bench_api.py --schema bench_api_kept   # seed once, reuse
    # options: --patients N, --clients N, --load wrk|python, --seconds S (wrk),
    #          --transitions N (python), --census-requests N, --port P

Targets (issue 5): >= 500 transition commands/s with p99 <= 100 ms; census p99 <= 50 ms.

1. Seed. `--patients` patients are admitted through the service (8 threads, group commit):
   each at level 3.5, 10 days ago, with a reassessment yesterday that indicates 2.1. The read
   models are then built (`StoreRunner`), so the census counts every one of them.
2. Serve. `continuum serve --workers 2 --no-project` runs on 127.0.0.1 with the development
   issuer; the clients hold tokens from the same key.
3. Transitions. `--clients` keep-alive connections each POST one step-down (3.5 -> 2.1) per
   patient, every patient once. The load generator is `wrk` (Debian's package, C; the default
   when it is installed) for `--seconds`, with `wrk_transitions.lua`, or `--load python`: as
   many threads as clients (httpx) for `--transitions` patients. The server shares the
   machine's two cores with its load generator: the Python one takes about 0.8 ms of CPU per
   request, wrk a tenth of that. Reported: commands/s over the whole run, p50/p99/max of each
   request's latency (client side: send to last byte), the CPU the API's processes used per
   command (from /proc: steadier than the rate on a shared machine) and the load generator's;
   and the transitions the store holds afterwards, which must match the 201 answers.
4. Census. `--census-requests` sequential GET /v1/census (current census by level, site,
   programme and age group over the 100,000 active patients). Reported: p50/p99/max.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
from sqlalchemy import Engine, func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from continuum.adapters.auth.tokens import DevIssuer
from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.store import SqlEventStore
from continuum.application.service import PatientService
from continuum.domain import commands as c
from continuum.domain.policy import PolicyRegistry
from continuum_projections import readmodel as rm
from continuum_projections.readmodel import ReadModel
from continuum_projections.runners import StoreRunner
from tests.support import assessment, fresh_pg_schema

PG_URL = os.environ.get(
    "CONTINUUM_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/continuum_test"
)


def say(message: str) -> None:
    print(message, flush=True)


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def seed(service: PatientService, n: int, threads: int = 8) -> list[str]:
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    admitted = now - dt.timedelta(days=10)
    reassessed = now - dt.timedelta(days=1)
    keys: list[str] = []
    lock = threading.Lock()
    done = 0
    started = time.perf_counter()

    def one(i: int) -> None:
        nonlocal done
        key = service.handle(
            c.Admit(
                level="3.5",
                site=f"site-{'abcd'[i % 4]}",
                program=f"prog-{i % 3}",
                age_group="adult" if i % 9 else "adolescent",
                assessment=assessment("001040"),
                occurred_at=admitted,
            )
        ).stream_id
        service.handle(
            c.RecordReassessment(
                patient_key=key, assessment=assessment("000020", 12), occurred_at=reassessed
            )
        )
        with lock:
            keys.append(key)
            done += 1
            if done % 5_000 == 0:
                rate = done / (time.perf_counter() - started)
                say(f"  seeded {done:,}/{n:,} patients ({rate:,.0f}/s)")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(n)))
    return keys


def serve(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "continuum.entrypoints.cli",
            "serve",
            "--workers",
            "2",
            "--no-project",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"continuum serve exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("continuum serve did not answer within 60 s")


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by `pid` and its descendants (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue  # gone meanwhile
        total += (int(fields[11]) + int(fields[12])) / ticks
        todo.extend(int(child) for child in children)
    return total


def transitions(base: str, token: str, keys: list[str], clients: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [keys[i::clients] for i in range(clients)]
    failures: list[str] = []

    def run(chunk: list[str]) -> None:
        mine: list[float] = []
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
            for key in chunk:
                t0 = time.perf_counter()
                response = client.post(f"/v1/patients/{key}/transitions", json={"to_level": "2.1"})
                mine.append(time.perf_counter() - t0)
                if response.status_code != 201:
                    failures.append(f"{response.status_code} {response.text[:200]}")
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} transitions failed, e.g. {failures[0]}")
    return len(keys) / elapsed, latencies


WRK_SCRIPT = Path(__file__).with_name("wrk_transitions.lua")


def transitions_wrk(
    base: str, token: str, keys: list[str], clients: int, seconds: int, threads: int, tmp: Path
) -> dict[str, Any]:
    """Run wrk for `seconds` over `keys` (one step-down each); its summary line, parsed, plus
    wrk's own CPU seconds."""
    key_file = tmp / "keys.txt"
    key_file.write_text("\n".join(keys) + "\n")
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{clients}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_SCRIPT),
        base,
        "--",
        str(key_file),
        token,
        str(threads),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, timeout=seconds + 120
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRK ")]
    if done.returncode != 0 or not lines:
        output = done.stdout[-800:] + done.stderr[-800:]
        raise SystemExit(f"wrk failed ({done.returncode}): {output}")
    summary: dict[str, Any] = json.loads(lines[-1][4:])
    if summary["exhausted_threads"]:
        raise SystemExit(
            f"wrk ran out of patients at 3.5 ({len(keys):,}): use fewer --seconds or a fresh "
            "--schema"
        )
    if summary["other"] or summary["socket_errors"] or summary["timeouts"]:
        raise SystemExit(f"wrk: not every transition was answered 201: {summary}")
    summary["client_cpu_s"] = (after.ru_utime + after.ru_stime) - (
        before.ru_utime + before.ru_stime
    )
    return summary


def stored_transitions(engine: Engine) -> int:
    with engine.connect() as conn:
        count = conn.execute(
            text("SELECT count(*) FROM events WHERE event_type = 'LevelTransitioned'")
        ).scalar()
    return int(count or 0)


def census(base: str, token: str, requests: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as client:
        for _ in range(requests):
            t0 = time.perf_counter()
            response = client.get("/v1/census")
            latencies.append(time.perf_counter() - t0)
            response.raise_for_status()
    return latencies


@contextlib.contextmanager
def database(name: str | None) -> Iterator[Engine]:
    """A fresh schema dropped afterwards, or the named one, kept (created and migrated)."""
    if name is None:
        with fresh_pg_schema(PG_URL, prefix="bench_api", pool_size=16) as engine:
            yield engine
        return
    admin = create_database_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{name}"'))
    admin.dispose()
    engine = create_database_engine(PG_URL, schema=name, pool_size=16)
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patients", type=int, default=100_000)
    parser.add_argument(
        "--load",
        choices=["wrk", "python"],
        default="wrk" if shutil.which("wrk") else "python",
        help="load generator (default: wrk when installed: apt-get install wrk)",
    )
    parser.add_argument("--seconds", type=int, default=20, help="wrk: how long to send")
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--transitions", type=int, default=10_000, help="python: how many")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--census-requests", type=int, default=500)
    parser.add_argument("--port", type=int, default=18_080)
    parser.add_argument("--quick", action="store_true", help="10,000 patients, 3,000 moves")
    parser.add_argument(
        "--schema",
        help="keep the data in this PostgreSQL schema and reuse it on the next run (seeded only "
        "when empty; each run moves patients still at 3.5)",
    )
    args = parser.parse_args()
    if args.quick:
        args.patients, args.transitions, args.seconds = 10_000, 3_000, 5
    policies = PolicyRegistry.bundled()
    with (
        database(args.schema) as engine,
        tempfile.TemporaryDirectory() as tmp,
    ):
        with engine.connect() as conn:
            schema = conn.exec_driver_sql("SELECT current_schema()").scalar() or ""
        store = SqlEventStore(engine)
        service = PatientService(store, policies)
        model = ReadModel(engine)
        model.create()
        if store.head_position() == 0:
            say(f"seeding {args.patients:,} active patients (admission + reassessment each)")
            seed(service, args.patients)
        say("building the read models")
        t0 = time.perf_counter()
        StoreRunner(store, model, policies).run()
        say(f"  projected up to {store.head_position():,} in {time.perf_counter() - t0:.1f} s")
        with engine.connect() as conn:
            keys = list(
                conn.execute(
                    select(rm.patients.c.patient_key).where(
                        rm.patients.c.active.is_(True), rm.patients.c.level == "3.5"
                    )
                ).scalars()
            )
            active = conn.execute(
                select(func.count()).where(rm.patients.c.active.is_(True))
            ).scalar()
        say(f"  {active:,} active patients, {len(keys):,} of them still at 3.5")
        needed = args.transitions if args.load == "python" else args.seconds * 1_500
        if len(keys) < needed + 50:
            raise SystemExit(f"only {len(keys):,} patients left at 3.5: use a fresh --schema")

        key_file = Path(tmp) / "dev-issuer.pem"
        issuer = DevIssuer.load_or_create(key_file, audience="care-continuum")
        clinician = issuer.issue(
            subject="bench-clinician",
            role="clinician",
            sites=["site-a", "site-b", "site-c", "site-d"],
            organization=None,
            ttl_seconds=3600,
        )
        env = {
            **os.environ,
            "CONTINUUM_DATABASE_URL": PG_URL,
            "PGOPTIONS": f"-csearch_path={schema}",
            "CONTINUUM_DEV_ISSUER_KEY_FILE": str(key_file),
        }
        proc = serve(env, args.port)
        base = f"http://127.0.0.1:{args.port}"
        try:
            say("census: warm-up, then sequential requests")
            census(base, clinician, 20)
            census_latency = census(base, clinician, args.census_requests)
            transitions(base, clinician, keys[-50:], 4)  # warm-up on other patients
            stored_before = stored_transitions(engine)
            cpu_before = tree_cpu_seconds(proc.pid)
            if args.load == "wrk":
                say(
                    f"transitions: wrk, {args.clients} connections, {args.seconds} s, one "
                    "step-down per patient"
                )
                summary = transitions_wrk(
                    base,
                    clinician,
                    keys[:-50],
                    args.clients,
                    args.seconds,
                    args.wrk_threads,
                    Path(tmp),
                )
                moved = int(summary["created"])
                rate = moved / (summary["duration_us"] / 1e6)
                p50, p99, worst = (summary[k] / 1000 for k in ("p50_us", "p99_us", "max_us"))
                client_cpu_ms = summary["client_cpu_s"] / moved * 1000
            else:
                moves = keys[: args.transitions]
                say(f"transitions: {len(moves):,} step-downs from {args.clients} client threads")
                before = time.process_time()
                rate, latency = transitions(base, clinician, moves, args.clients)
                client_cpu_ms = (time.process_time() - before) / len(moves) * 1000
                moved = len(moves)
                p50, p99, worst = (
                    statistics.median(latency) * 1000,
                    pct(latency, 0.99) * 1000,
                    max(latency) * 1000,
                )
            server_cpu_ms = (tree_cpu_seconds(proc.pid) - cpu_before) / moved * 1000
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        stored = stored_transitions(engine) - stored_before
    ms = 1000.0
    say("")
    say(
        f"transition commands/s (2 workers, {args.clients} clients, load from {args.load}): "
        f"{rate:,.0f}  (target >= 500)"
    )
    say(
        f"answered 201: {moved:,}; new transitions in the store: {stored:,} (a request still in "
        "flight when wrk stops may add one per connection)"
    )
    if not moved <= stored <= moved + args.clients:
        raise SystemExit("the store's transitions do not match the 201 answers")
    say(
        f"CPU per transition: API processes {server_cpu_ms:.2f} ms (steadier than the rate), "
        f"load generator {client_cpu_ms:.2f} ms"
    )
    say(
        f"transition latency ms: p50 {p50:.1f}  p99 {p99:.1f}  max {worst:.1f}  (target p99 <= 100)"
    )
    say(
        f"census latency ms over {active:,} active patients: p50 "
        f"{statistics.median(census_latency) * ms:.1f}  p99 {pct(census_latency, 0.99) * ms:.1f}  "
        f"max {max(census_latency) * ms:.1f}  (target p99 <= 50)"
    )


if __name__ == "__main__":
    main()
