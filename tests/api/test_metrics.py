"""GET /metrics: Prometheus text exposition of commands, refusals by rule, and lags.

Counters are process-wide (as Prometheus counters are), so the tests compare a scrape before
and after; the gauges are computed at scrape time and must equal the lag found independently.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from continuum.adapters.sql.database import create_database_engine
from continuum.adapters.sql.migrate import upgrade
from continuum.adapters.sql.store import SqlCheckpoints
from continuum.domain.policy import PolicyRegistry
from tests.api.conftest import Api, _api, admit_body, assessment, days_ago
from tests.kafka_broker import BrokerInfo, create_topic, free_port, unique_name

CLI = [sys.executable, "-m", "continuum.entrypoints.cli"]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(api: Api) -> Samples:
    response = api.client.get("/metrics")  # no token: scrapers send none
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_commands_and_refusals_are_counted_by_type_and_rule(sqlite_api: Api) -> None:
    api = sqlite_api
    before = scrape(api)
    clinician = api.auth("clinician")
    admitted = api.client.post("/v1/patients", json=admit_body(days=20), headers=clinician)
    assert admitted.status_code == 201, admitted.text
    key = admitted.json()["patient_key"]
    # The admission assessment is 20 days old: a step-down now is refused by a rule.
    refused = api.client.post(
        f"/v1/patients/{key}/transitions", json={"to_level": "2.1"}, headers=clinician
    )
    assert refused.status_code in (409, 422), refused.text
    rule = refused.json()["rule"]
    api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"occurred_at": days_ago(1), "assessment": assessment("000020", hours=12)},
        headers=clinician,
    ).raise_for_status()
    moved = api.client.post(
        f"/v1/patients/{key}/transitions", json={"to_level": "2.1"}, headers=clinician
    )
    assert moved.status_code in (200, 201), moved.text
    # A retry with the same Idempotency-Key writes nothing and counts as replayed.
    body, again = admit_body(days=5), {**clinician, "Idempotency-Key": "metrics-retry-1"}
    for _ in range(2):
        api.client.post("/v1/patients", json=body, headers=again).raise_for_status()
    # Another site's patient: refused by the access rule before anything is decided.
    other = api.client.post(
        f"/v1/patients/{key}/reassessments",
        json={"occurred_at": days_ago(1), "assessment": assessment()},
        headers=api.auth("clinician", ("site-b",)),
    )
    assert other.status_code in (403, 404), other.text

    after = scrape(api)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("continuum_commands_total", command="Admit", replayed="false") == 2
    assert delta("continuum_commands_total", command="Admit", replayed="true") == 1
    assert delta("continuum_commands_total", command="RecordReassessment", replayed="false") == 1
    assert delta("continuum_commands_total", command="Transition", replayed="false") == 1
    assert delta("continuum_command_refusals_total", command="Transition", rule=rule) == 1
    refusals = {
        labels: v - before.get((name, labels), 0.0)
        for (name, labels), v in after.items()
        if name == "continuum_command_refusals_total"
    }
    assert sum(refusals.values()) == 2  # the stale step-down and the other site's clinician
    assert key not in api.client.get("/metrics").text  # no patient data in the metrics


def test_lag_gauges_equal_the_real_lag(sqlite_api: Api) -> None:
    api = sqlite_api
    clinician = api.auth("clinician")
    for days in (30, 20, 10):
        api.client.post("/v1/patients", json=admit_body(days=days), headers=clinician)
    head = api.head()
    assert head >= 3
    samples = scrape(api)
    assert value(samples, "continuum_log_head_position") == head
    # Nothing projected and no relay yet.
    assert value(samples, "continuum_projection_lag_events", checkpoint="store") == 0
    assert not [k for k in samples if k[0] == "continuum_relay_lag_events"]

    api.project()
    checkpoints = SqlCheckpoints(api.engine)
    checkpoints.put("relay:continuum.events.v1", 2)
    api.client.post("/v1/patients", json=admit_body(days=5), headers=clinician)
    head = api.head()
    samples = scrape(api)
    projected = api.ctx.read_model.checkpoint("store")
    assert 0 < projected < head
    assert value(samples, "continuum_projection_lag_events", checkpoint="store") == (
        head - projected
    )
    assert value(samples, "continuum_relay_lag_events", relay="relay:continuum.events.v1") == (
        head - checkpoints.get("relay:continuum.events.v1")
    )
    assert value(samples, "continuum_metrics_source_up", source="database") == 1
    api.project()
    samples = scrape(api)
    assert value(samples, "continuum_projection_lag_events", checkpoint="store") == 0
    age = value(samples, "continuum_projection_checkpoint_age_seconds", checkpoint="store")
    assert 0 <= age < 60


def test_metrics_is_not_in_the_openapi_document(sqlite_api: Api) -> None:
    paths = sqlite_api.client.get("/openapi.json").json()["paths"]
    assert "/metrics" not in paths
    assert sqlite_api.client.get("/metrics", params={"x": "1"}).status_code == 422


@pytest.mark.kafka
def test_dead_letter_depth_is_read_from_the_dlq_topic(
    tmp_path: Path, policies: PolicyRegistry, kafka_broker: BrokerInfo
) -> None:
    from kafka import KafkaProducer

    adt = unique_name("adt")
    dlq = create_topic(kafka_broker.bootstrap_servers, adt + ".dlq", partitions=2)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap_servers)
    try:
        for n in range(3):
            producer.send(dlq, key=f"k{n}".encode(), value=b"MSH|^~\\&|broken")
            producer.flush()  # one batch each (Tansu counts a batch's end by its first offset)
    finally:
        producer.close()
    url = f"sqlite:///{tmp_path / 'api.sqlite3'}"
    engine = create_database_engine(url)
    upgrade(engine)
    try:
        api = _api(
            engine,
            url,
            tmp_path,
            policies,
            metrics_kafka=True,
            adt_topic=adt,
            kafka_bootstrap_servers=kafka_broker.bootstrap_servers,
        )
        samples = scrape(api)
    finally:
        engine.dispose()
    assert value(samples, "continuum_metrics_source_up", source="kafka") == 1
    assert value(samples, "continuum_ingest_dlq_messages", topic=dlq) == 3


# -- several API processes ---------------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`continuum serve --workers 2` on a free port, with its environment."""
    env = {
        **os.environ,
        "CONTINUUM_DATABASE_URL": f"sqlite:///{tmp_path / 'served.sqlite3'}",
        "CONTINUUM_DEV_ISSUER_KEY_FILE": str(tmp_path / "issuer.pem"),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    port = free_port()
    subprocess.run([*CLI, "db", "upgrade"], env=env, check=True, capture_output=True)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [*CLI, "serve", "--workers", "2", "--port", str(port), "--no-project"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{port}", env
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_workers_share_their_counters(served: tuple[str, dict[str, str]]) -> None:
    import json
    import urllib.request
    from urllib.error import URLError

    base, env = served
    token = subprocess.run(
        [*CLI, "token", "create", "--role", "clinician", "--site", "site-a"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()

    def call(path: str, body: object | None = None) -> tuple[int, str]:
        request = urllib.request.Request(
            base + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()

    deadline = time.monotonic() + 60
    while True:
        try:
            if call("/metrics")[0] == 200:
                break
        except (URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "continuum serve did not answer"
        time.sleep(0.2)
    admits = 8
    for n in range(admits):
        status, text = call("/v1/patients", admit_body(days=10 + n))
        assert status == 201, text
    for _ in range(6):  # whichever worker answers (a new connection each time): the sum
        samples = parse(call("/metrics")[1])
        assert value(samples, "continuum_commands_total", command="Admit", replayed="false") == (
            admits
        )
