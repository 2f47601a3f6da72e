"""A throwaway PostgreSQL server for the tests of the SQL stores (the ledger archive, the
identity store): ``postgres_url``, once per session, skipped when PostgreSQL is not
installed."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.store.embedded import free_port


def _pg_bin() -> str | None:
    found = shutil.which("pg_ctl")
    if found:
        return str(Path(found).resolve().parent)
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL cluster in tmp on a free port (as user postgres when root)."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL not installed (no pg_ctl on PATH or /usr/lib/postgresql)")
    user: str | None = None
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and no 'postgres' user to run initdb as")
        user = "postgres"
    # its own dir under /tmp: pytest's tmp tree is private to root, postgres must enter it
    base = Path(tempfile.mkdtemp(prefix="leadflow-pg-"))
    data = base / "data"
    if user:
        shutil.chown(base, user)
    port = free_port()
    def pg(*args: str, check: bool = True) -> None:
        subprocess.run(list(args), check=check, user=user, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    pg(f"{bindir}/initdb", "-D", str(data), "-U", "leadflow", "--auth=trust", "-E", "UTF8",
       "--no-sync")
    # -w: pg_ctl itself waits until the server accepts connections
    pg(f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(base / "log"),
       "-o", f"-p {port} -k {base} -h 127.0.0.1 -F", "start")
    try:
        yield f"postgresql://leadflow@127.0.0.1:{port}/postgres"
    finally:
        pg(f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)
