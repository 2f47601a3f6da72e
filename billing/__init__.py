"""leadflow billing: money, accounts, ledger, payments and recharge."""

from billing.errors import BillingError

__all__ = ["BillingError"]
