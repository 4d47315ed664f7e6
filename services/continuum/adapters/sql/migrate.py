"""Schema management with alembic, run programmatically on the service's own engine."""

from __future__ import annotations

from importlib import resources

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from continuum.domain.errors import StoreNotReady

SCRIPT_LOCATION = str(resources.files("continuum.adapters.sql").joinpath("migrations"))


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", SCRIPT_LOCATION)
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the schema to the newest revision; return (before, after)."""
    before = current_revision(engine)
    config = _config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    return before, head_revision()


def ensure_ready(engine: Engine, *, auto_upgrade: bool) -> None:
    """Raise StoreNotReady unless the schema is current; upgrade it first when allowed."""
    current, head = current_revision(engine), head_revision()
    if current == head:
        return
    if auto_upgrade:
        upgrade(engine)
        return
    where = engine.url.render_as_string(hide_password=True)
    raise StoreNotReady(
        f"database {where} is at schema revision {current or 'none'}, expected {head}: "
        "run `continuum db upgrade`",
        current=current,
        expected=head,
    )
