"""leadflow billing: money, accounts, ledger, payments and recharge."""

from engine.core.billing_errors import BillingError

__all__ = ["BillingError"]
