"""Settings from the environment (CONTINUUM_*), built once at start-up and passed in."""

from __future__ import annotations

from pathlib import Path

from platformdirs import user_data_dir
from pydantic import Field, field_validator
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
    adt_mapping: Path | None = Field(
        default=None, description="TOML file mapping hospital locations to levels."
    )

    @field_validator("database_url")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("CONTINUUM_DATABASE_URL is empty")
        return value.strip()
