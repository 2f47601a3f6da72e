"""Billing's errors, under leadflow's one exception root (:class:`LeadflowError`)."""

from __future__ import annotations

from engine.core.errors import LeadflowError


class BillingError(LeadflowError):
    """Base class of every error raised by ``billing``.

    ``code`` is a stable machine-readable identifier documented in the README.
    """

    code: str = "billing_error"
    status: int = 400  # the HTTP status engine.api.billing answers with

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MoneyError(BillingError, ValueError):
    code = "invalid_amount"


class InvalidRequest(BillingError, ValueError):
    """A request breaks a billing rule (minimum amount, unknown meter, ...); nothing moved."""

    code = "invalid_request"
    status = 400


class Unauthorized(BillingError):
    code = "unauthorized"
    status = 401


class ServiceUnavailable(BillingError):
    code = "unavailable"
    status = 503


class UnknownAccount(BillingError):
    code = "unknown_account"
    status = 404


class AccountClosed(BillingError):
    code = "account_closed"
    status = 409


class InsufficientFunds(BillingError):
    code = "insufficient_funds"
    status = 402


class NoPaymentMethod(BillingError):
    code = "no_payment_method"
    status = 409


class Busy(BillingError):
    """Another charge or refund of the same account is in flight; retry later."""

    code = "busy"
    status = 409



class PaymentError(BillingError):
    """Base class of errors that come from the card processor."""

    code = "payment_error"
    status = 502


class UnknownPaymentMethod(PaymentError):
    code = "unknown_payment_method"
    status = 404


class CardDeclined(PaymentError):
    """The issuer declined (``card_declined``, ``insufficient_funds``, ``expired_card``, ...).

    ``decline_code`` keeps Stripe's code; ``payment_intent`` is the failed intent, if any.
    """

    code = "card_declined"
    status = 402

    def __init__(self, message: str, *, decline_code: str = "card_declined",
                 payment_intent: str = "") -> None:
        super().__init__(message)
        self.decline_code = decline_code
        self.payment_intent = payment_intent


class AuthenticationRequired(PaymentError):
    """The bank wants the cardholder (3-D Secure): never retried off-session."""

    code = "authentication_required"
    status = 402

    def __init__(self, message: str, *, payment_intent: str = "") -> None:
        super().__init__(message)
        self.payment_intent = payment_intent


class PaymentTransient(PaymentError):
    """Network trouble, rate limit or a 5xx: the outcome is unknown, look it up before retrying."""

    code = "payment_unavailable"
    status = 503


class PaymentBusy(PaymentTransient):
    """Stripe is still working on a request with the same idempotency key (HTTP 409), or
    refused the key (``IdempotencyError``). Another worker is charging this very card try:
    not a decline. The attempt stays as it is (its card ``charging``) and is looked up,
    never charged blindly, when retried later."""

    code = "busy"
    status = 409


class PaymentsFailed(PaymentError):
    """Every eligible card failed; ``attempt`` is the recorded attempt id."""

    code = "payment_failed"
    status = 402

    def __init__(self, message: str, *, attempt: str = "", needs_customer: bool = False) -> None:
        super().__init__(message)
        self.attempt = attempt
        self.needs_customer = needs_customer
        if needs_customer:
            self.code = "authentication_required"
