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

    @field_validator("database_url")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("CONTINUUM_DATABASE_URL is empty")
        return value.strip()
