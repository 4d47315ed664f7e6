"""Settings from the environment (CONTINUUM_*), built once at start-up and passed in."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from platformdirs import user_data_dir
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_database_url() -> str:
    return f"sqlite:///{Path(user_data_dir('care-continuum')) / 'continuum.sqlite3'}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONTINUUM_", extra="ignore")

    database_url: str = Field(
        default_factory=default_database_url,
        description="sqlite:///PATH (embedded default) or postgresql://USER@HOST/DB",
    )
    policy: str = Field(default="asam-3", description="Policy id for new episodes.")
    policy_dirs: list[Path] = Field(
        default_factory=list, description="Extra directories of policy documents (*.toml)."
    )
    actor_id: str = Field(default="cli-user", pattern=r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,63}$")
    actor_role: str = Field(default="case_manager")

    # -- Kafka ------------------------------------------------------------------------------
    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list."
    )
    kafka_client_id: str = "care-continuum"
    events_topic: str = Field(default="continuum.events.v1", pattern=r"^[A-Za-z0-9._\-]{1,249}$")
    adt_topic: str = Field(default="hospital.adt.v1", pattern=r"^[A-Za-z0-9._\-]{1,249}$")
    ingest_group: str = "continuum-ingest"
    #: Consumer-group timing must follow the broker: Apache Kafka refuses session timeouts
    #: under group.min.session.timeout.ms (6 s by default); Tansu answers JoinGroup only after
    #: session_timeout / 2, so tests against it use a short one.
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1_000)
    kafka_heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    kafka_request_timeout_ms: int = Field(default=30_000, ge=1_000)
    kafka_connect_timeout_ms: int = Field(
        default=30_000, ge=500, description="How long to try reaching the broker at start-up."
    )
    relay_batch_size: int = Field(default=2_000, ge=1, le=100_000)
    relay_poll_interval_ms: int = Field(
        default=200, ge=10, description="Polling interval where LISTEN/NOTIFY is unavailable."
    )
    # -- projections ------------------------------------------------------------------------
    read_model_url: str | None = Field(
        default=None,
        description="Database of the read models (census, audit trail, metrics); default: "
        "the event store's database.",
    )
    capacity_file: Path | None = Field(
        default=None, description="TOML of places per site and level, for census occupancy."
    )
    adt_mapping: Path | None = Field(
        default=None, description="TOML file mapping hospital locations to levels."
    )
    # -- HTTP API -----------------------------------------------------------------------------
    api_host: str = Field(default="127.0.0.1", description="Address `continuum serve` binds.")
    api_port: int = Field(default=8080, ge=1, le=65535)
    api_workers: int = Field(default=1, ge=1, le=64)
    metrics_kafka: bool = Field(
        default=False,
        description="GET /metrics also asks Kafka for the ingest dead-letter topic's depth.",
    )
    api_max_body_bytes: int = Field(
        default=65_536, ge=1_024, le=16_777_216, description="Larger request bodies get 413."
    )
    api_max_projection_lag: int = Field(
        default=10_000, ge=0, description="Readiness fails when projections lag more events."
    )
    # -- authentication -----------------------------------------------------------------------
    auth_mode: Literal["dev", "oidc"] = Field(
        default="dev",
        description="dev: the local development issuer (never in production); oidc: verify "
        "tokens from CONTINUUM_AUTH_ISSUER.",
    )
    auth_issuer: str | None = Field(default=None, description="The OIDC issuer URL (iss).")
    auth_audience: str = Field(default="care-continuum", min_length=1, max_length=200)
    auth_jwks_url: str | None = Field(
        default=None, description="The issuer's JWKS URL; discovered from the issuer if unset."
    )
    auth_leeway_seconds: int = Field(default=30, ge=0, le=300, description="Clock skew allowed.")
    auth_role_claim: str = Field(default="role", min_length=1, max_length=100)
    dev_issuer_key_file: Path | None = Field(
        default=None, description="The development issuer's private key (created 0600)."
    )
    # -- disclosure ---------------------------------------------------------------------------
    #: Each recipient organization's disclosure topic: "{org}" is replaced by its code
    #: (docs/consent.md). `continuum disclose` uses the relay's batch size and poll interval.
    disclosure_topic_pattern: str = Field(
        default="continuum.disclosure.{org}.v1",
        pattern=r"^[A-Za-z0-9._\-]*\{org\}[A-Za-z0-9._\-]*$",
    )

    @model_validator(mode="after")
    def _issuer_for_oidc(self) -> Settings:
        if self.auth_mode != "oidc":
            return self
        if not self.auth_issuer:
            raise ValueError(
                "CONTINUUM_AUTH_MODE=oidc needs CONTINUUM_AUTH_ISSUER (the issuer URL, e.g. "
                "https://login.example.org/realms/care)"
            )
        from continuum.adapters.auth.tokens import insecure_url_problem

        for name, url in (("ISSUER", self.auth_issuer), ("JWKS_URL", self.auth_jwks_url)):
            problem = None if url is None else insecure_url_problem(url)
            if problem is not None:
                raise ValueError(f"CONTINUUM_AUTH_{name}: {problem}")
        return self

    @field_validator("database_url")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("CONTINUUM_DATABASE_URL is empty")
        return value.strip()
