"""The one exception base class of the billing package."""


class BillingError(Exception):
    """Base class of every error raised by ``billing``.

    ``code`` is a stable machine-readable identifier documented in the README.
    """

    code: str = "billing_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class MoneyError(BillingError, ValueError):
    code = "invalid_amount"
