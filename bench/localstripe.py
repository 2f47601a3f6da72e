"""A localstripe server (the stateful Stripe emulator from PyPI) on a free loopback port.

Shared by the tests (tests/helpers/stripe_fixture.py) and the recharge benchmark, so there is one
way to start it, wait for it and stop it.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from engine.store.embedded import free_port, stop_process

API_KEY = "sk_test_leadflow"
# localstripe keeps its state in a pickle under /tmp by default; a throwaway server must not
# share it with (or leave it to) any other run
_BOOT = (
    "import sys, localstripe.resources as r; r.Store.dump_to_disk = lambda self: None; "
    "from localstripe import server; server.start()"
)


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    req = urllib.request.Request(url + "/v1/customers",
                                 headers={"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError("localstripe exited at start")
        try:
            with urllib.request.urlopen(req, timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"localstripe did not answer on {url}")
        time.sleep(0.05)  # poll interval while another process starts


@contextlib.contextmanager
def serve_localstripe(timeout: float = 20.0) -> Iterator[str]:
    """Start localstripe (no persistence), wait until it answers; yields its base URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _BOOT, "--port", str(port), "--from-scratch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, proc, timeout)
        yield url
    finally:
        stop_process(proc)
