"""The identity store's refusals: each with a stable ``code`` and the HTTP ``status`` the
API answers with (README "Portal API"); a refused call changed nothing."""

from __future__ import annotations

from engine.core.errors import LeadflowError


class IdentityError(LeadflowError):
    code = "identity_error"
    status = 400

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidInput(IdentityError):
    """An e-mail that is not one, a key name out of bounds."""

    code = "invalid_body"


class WeakPassword(IdentityError):
    code = "weak_password"


class UnknownUser(IdentityError):
    """No such user of this tenant (another tenant's is unknown too)."""

    code = "unknown_user"
    status = 404


class UnknownKey(IdentityError):
    code = "unknown_key"
    status = 404


class EmailTaken(IdentityError):
    code = "email_taken"
    status = 409


class UserDisabled(IdentityError):
    code = "user_disabled"
    status = 409


class OperatorUser(IdentityError):
    """An operator (role ``operator``) is mapped to no client account and has no buyer key."""

    code = "operator_user"
    status = 409


class TooManyKeys(IdentityError):
    code = "too_many_keys"
    status = 409


class InviteInvalid(IdentityError):
    """Unknown, used, expired, or its user disabled or deleted: one answer for all."""

    code = "invite_invalid"
    status = 410
