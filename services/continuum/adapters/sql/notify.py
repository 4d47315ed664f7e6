"""Wake-up on commit: PostgreSQL LISTEN/NOTIFY (a trigger notifies on every append)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, text

from continuum.application.relay import Waiter

CHANNEL = "continuum_events"


class PgNotifyWaiter(Waiter):
    """Sleeps until an append to this store's schema commits, or the timeout passes."""

    def __init__(self, engine: Engine) -> None:
        self._conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self.schema = str(self._conn.scalar(text("SELECT current_schema()")))
        self._conn.exec_driver_sql(f"LISTEN {CHANNEL}")
        self._driver: Any = self._conn.connection.driver_connection

    def wait(self, timeout: float) -> bool:
        for notice in self._driver.notifies(timeout=timeout):
            if notice.payload == self.schema:
                return True
        return False

    def close(self) -> None:
        self._conn.close()
