"""The harness's config (tests/helpers/harness.py) with e-mail notifications: tenant t1
with its ``operators``, a mail transport, and client c1 named "Bright Solar" with one
contact. Shared by the notify tests."""

from __future__ import annotations

from collections.abc import Sequence

from tests.helpers.harness import BASE_TOML

CONTACT = "ap@bright.example"
SENDER = "Acme Leads <billing@acme.example>"


def smtp_table(host: str, port: int) -> str:
    return (f'[tenants.notify.smtp]\nhost = "{host}"\nport = {port}\nsecurity = "plain"\n'
            f'sender = "{SENDER}"\ntimeout_s = 5\n')


def sendgrid_table(url: str) -> str:
    return ('[tenants.notify.sendgrid]\napi_key = "env:LEADFLOW_TEST_SENDGRID_KEY"\n'
            f'sender = "{SENDER}"\nbase_url = "{url}"\ntimeout_s = 5\n')


def notify_toml(transport: str, *, operators: Sequence[str] = ("ops@acme.example",),
                weekly_day: str | None = None, opening: str = "25.00",
                timezone: str = "UTC") -> str:
    """BASE_TOML with ``[tenants.notify]`` for t1 (``transport``: a table above) and c1's
    contact. The weekly report is off unless ``weekly_day`` is given (it is due on some
    days of the week: its own tests set the day and inject the clock)."""
    weekly = (f'[tenants.notify.weekly_report]\nday = "{weekly_day}"\nat = "09:00"\n'
              if weekly_day else '[tenants.notify.weekly_report]\nenabled = false\n')
    listed = ", ".join(f'"{o}"' for o in operators)
    toml = BASE_TOML.replace('timezone = "UTC"', f'timezone = "{timezone}"', 1).replace(
        '[tenants.wallet]\nopening_balance = "1000.00"\n',
        '[tenants.wallet]\nopening_balance = "1000.00"\n'
        f'[tenants.notify]\noperators = [{listed}]\n' + weekly + transport)
    return toml.replace('id = "c1"\nopening_balance = "100.00"',
                        f'id = "c1"\nname = "Bright Solar"\nopening_balance = "{opening}"\n'
                        f'contacts = ["{CONTACT}"]')
