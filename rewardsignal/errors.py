"""One exception hierarchy shared by the coordinator, the worker and the SDK.

Every error carries a stable machine-readable ``code`` and the HTTP status the
coordinator answers with, so a client raises the same type the server raised.
Each class also subclasses the stdlib error it refines (``ValidationError`` is a
``ValueError``) so callers that only know the stdlib still catch it.
"""

from __future__ import annotations


class SignalError(Exception):
    code = "internal"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_json(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class ValidationError(SignalError, ValueError):
    """The request or file is malformed; nothing was changed."""

    code = "invalid_request"
    http_status = 400


class DataError(ValidationError):
    """An example or dataset line is malformed (names the field and line)."""

    code = "invalid_data"


class AuthError(SignalError, PermissionError):
    code = "unauthorized"
    http_status = 401


class ForbiddenError(SignalError, PermissionError):
    code = "forbidden"
    http_status = 403


class NotFoundError(SignalError, LookupError):
    code = "not_found"
    http_status = 404


class ConflictError(SignalError):
    code = "conflict"
    http_status = 409


class PayloadTooLargeError(ValidationError):
    code = "payload_too_large"
    http_status = 413


class RejectedUpdate(SignalError):
    """A worker submission failed validation; the run is unchanged."""

    code = "rejected"
    http_status = 422

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}", code=f"rejected_{reason}")
        self.reason = reason
        self.detail = message


class NoWorkerError(SignalError, TimeoutError):
    code = "no_worker"
    http_status = 503


class CoordinatorUnavailableError(SignalError, ConnectionError):
    """The coordinator did not answer within the client's retry window. If the
    call was accepted before, ``request_id`` names it: ``client.wait(request_id)``
    picks it up again once the coordinator is back."""

    code = "unavailable"
    http_status = 503

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestTimeoutError(SignalError, TimeoutError):
    code = "timeout"
    http_status = 504


class TaskFailedError(SignalError, RuntimeError):
    code = "task_failed"
    http_status = 500


class CheckpointError(SignalError, OSError):
    code = "checkpoint_corrupt"
    http_status = 500


_BY_CODE: dict[str, type[SignalError]] = {}
for _cls in (
    SignalError, ValidationError, DataError, AuthError, ForbiddenError, NotFoundError,
    ConflictError, PayloadTooLargeError, NoWorkerError, RequestTimeoutError,
    TaskFailedError, CheckpointError,
):
    _BY_CODE[_cls.code] = _cls


def error_from_json(status: int, body: object) -> SignalError:
    """Rebuild the typed error a coordinator sent as ``{"error": {code, message}}``."""
    code, message = "internal", f"HTTP {status}"
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = str(body["error"].get("code", code))
        message = str(body["error"].get("message", message))
    if code.startswith("rejected_"):
        return RejectedUpdate(code.removeprefix("rejected_"), message.split(": ", 1)[-1])
    cls = _BY_CODE.get(code)
    if cls is None:
        cls = {400: ValidationError, 401: AuthError, 403: ForbiddenError, 404: NotFoundError,
               409: ConflictError, 413: PayloadTooLargeError, 503: NoWorkerError,
               504: RequestTimeoutError}.get(status, SignalError)
    err = cls(message)
    err.code = code
    err.http_status = status
    return err


def http_status_for(code: str) -> int:
    """The HTTP status the coordinator uses for an error code."""
    if code.startswith("rejected_"):
        return RejectedUpdate.http_status
    cls = _BY_CODE.get(code)
    return cls.http_status if cls is not None else 500
