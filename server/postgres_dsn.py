"""A PostgreSQL connection string as logs and errors may show it: never its password.

The usage ledger and the key store each connect to a DSN that may carry a
password; both name the database as user@host:port/dbname, and both scrub
the password from a driver error that echoes it.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict


class Dsn:
    """A DSN, and the two safe ways to speak of it."""

    __slots__ = ("_password", "text", "where")

    def __init__(self, text: str) -> None:
        self.text = text
        try:
            info = conninfo_to_dict(text)
        except psycopg.ProgrammingError:
            self.where = "(an unparsable DSN)"
            self._password = ""
            return
        user = f"{info['user']}@" if info.get("user") else ""
        port = f":{info['port']}" if info.get("port") else ""
        host = info.get("host") or info.get("hostaddr") or "localhost"
        # user@host:port/dbname, for logs and errors.
        self.where = f"{user}{host}{port}/{info.get('dbname', '')}"
        self._password = str(info.get("password") or "")

    def scrubbed(self, err: BaseException) -> str:
        """The error's first line, without the DSN's password should it echo it."""
        text = str(err).strip() or type(err).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text.splitlines()[0]


def describe(dsn: str) -> str:
    """user@host:port/dbname of a DSN, for logs and errors (never the password)."""
    return Dsn(dsn).where
