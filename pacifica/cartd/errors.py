"""The service's exception tree: each error knows its HTTP status and whether a retry may help."""
from __future__ import annotations

import json


def error_document(status: str, message: str, version: str) -> str:
    """An error answer's JSON body, with the four keys 0.7.0 sends (the traceback stays in the log)."""
    return json.dumps({'status': status, 'message': message, 'traceback': '', 'version': version})


class CartError(Exception):
    """Base of every error the service raises on purpose."""

    http_status = 500
    transient = False

    @property
    def message(self) -> str:
        """The text shown to clients and written to the cart's error."""
        return str(self)


class ConfigError(CartError):
    """A configuration value is missing or does not parse; start-up stops."""


class BadRequest(CartError):
    """The client sent something the service will not accept."""

    http_status = 400


class PayloadTooLarge(BadRequest):
    """The request body is over the configured limit."""

    http_status = 413


class CartNotFound(CartError):
    """No live cart has this uid."""

    http_status = 404


class CartNotReady(CartError):
    """The cart exists but cannot be downloaded yet (or failed)."""

    http_status = 202


class CartExpired(CartError):
    """The cart outlived its lifetime: its files are gone or going; it can be posted again."""

    http_status = 410


class RangeNotSatisfiable(CartError):
    """A Range header asks for bytes outside the tar."""

    http_status = 416


class QueueUnavailable(CartError):
    """The broker did not take the cart's tasks."""

    http_status = 503
    transient = True


class DatabaseUnavailable(CartError):
    """The database could not be reached after the configured attempts."""

    http_status = 503
    transient = True


class SchemaTooOld(CartError):
    """The database schema must be upgraded with `pacifica-cartd-cmd dbsync`."""

    http_status = 503


class FileStageError(CartError):
    """Staging one file failed; the message names the cause."""


class ArchiveError(FileStageError):
    """The archive interface answered with an error or could not be reached."""

    transient = True


class ArchiveFileMissing(FileStageError):
    """The archive has no such file (it answers 500 with its error page)."""


class ArchiveMediaError(FileStageError):
    """The archive reports the file's media as 'error'."""


class ArchiveTimeout(ArchiveError):
    """The archive did not answer (or send more bytes) within the timeout."""


class ArchiveShortRead(ArchiveError):
    """The archive closed the body before sending every byte it announced."""


class HashMismatch(FileStageError):
    """The bytes downloaded do not have the hash the client gave."""


class NoSpace(FileStageError):
    """The volume has no room for the file."""


class CartGone(CartError):
    """The cart was deleted while work on it was going on; stop quietly."""

    http_status = 404


class NotificationFailed(CartError):
    """A completion event's target did not answer 2xx (or could not be reached): sent again later."""

    transient = True
