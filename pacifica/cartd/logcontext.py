"""What a log line is about (the cart's uid and id, the file's path and archive id, the task), kept in
context variables, and the two log formats that write it on every line: plain text with the context
appended, or one JSON object a line (`log_format = json`).

The code that starts work on a cart or file says so once (`about`), and every line logged inside,
by this package, by Celery for the task or by the archive client, carries it. Each thread has its
own context: a pool thread sets its file's for the length of the file's work.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
from typing import Any, Dict, Iterable, Iterator, Optional

PLAIN, JSON = 'plain', 'json'
FORMATS = (PLAIN, JSON)
FIELDS = ('cart_uid', 'cart_id', 'file_path', 'archive_id', 'task_id')
# The plain suffix's names for them, e.g. "... [cart=abc file=run1/a.dat]"; ids only in JSON.
PLAIN_NAMES = {'cart_uid': 'cart', 'file_path': 'file'}

_CONTEXT: contextvars.ContextVar[Optional[Dict[str, Any]]] = contextvars.ContextVar('cartd_log_context',
                                                                                  default=None)
NEEDS_QUOTES = frozenset(' []="')


def current() -> Dict[str, Any]:
    """What lines logged now are about (field -> value, only the fields that are set; never changed in place)."""
    return _CONTEXT.get() or {}


@contextlib.contextmanager
def about(**fields: Any) -> Iterator[None]:
    """Lines logged inside are about these (cart_uid, cart_id, file_path, archive_id, task_id; None: not set),
    on top of what the enclosing work is about; the context is as before on the way out."""
    token = _CONTEXT.set(_merged(fields))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def settle(**fields: Any) -> None:
    """Lines logged from now on until `forget` are about these too (for work whose end is another
    callback, such as a Celery task's prerun and postrun signals)."""
    _CONTEXT.set(_merged(fields))


def forget() -> None:
    """Lines logged from now on are about nothing in particular."""
    _CONTEXT.set({})


def _merged(fields: Dict[str, Any]) -> Dict[str, Any]:
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise TypeError(f'not a log context field: {", ".join(sorted(unknown))}')
    merged = dict(current())
    merged.update({name: value for name, value in fields.items() if value is not None})
    return merged


def _suffix(context: Dict[str, Any]) -> str:
    parts = []
    for field, name in PLAIN_NAMES.items():
        if field in context:
            value = str(context[field])
            parts.append(f'{name}={json.dumps(value) if not value or NEEDS_QUOTES & set(value) else value}')
    return f' [{" ".join(parts)}]' if parts else ''


class PlainFormatter(logging.Formatter):
    """Another formatter's lines with the cart's uid and the file's path appended to the message
    (before any traceback), e.g. `... recall requested [cart=abc file=run1/a.dat]`."""

    def __init__(self, inner: Optional[logging.Formatter] = None) -> None:
        """Format as `inner` does (logging's default when None), adding the context."""
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        """The inner formatter's line for a copy of `record` whose message ends with the context."""
        suffix = _suffix(current())
        if not suffix:
            return self.inner.format(record)
        copy = logging.makeLogRecord(record.__dict__)
        copy.msg, copy.args = record.getMessage() + suffix, None
        copy.exc_text = None
        return self.inner.format(copy)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, local offset), level, logger, process, thread, message,
    the context's fields that are set, and any traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line: Dict[str, Any] = {
            'time': datetime.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec='milliseconds'),
            'level': record.levelname,
            'logger': record.name,
            'process': record.processName,
            'pid': record.process,
            'thread': record.threadName,
            'message': record.getMessage(),
        }
        line.update(current())
        if record.exc_info:
            line['exception'] = self.formatException(record.exc_info)
        elif record.exc_text:
            line['exception'] = record.exc_text
        if record.stack_info:
            line['stack'] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def formatter_for(log_format: str, inner: Optional[logging.Formatter] = None) -> logging.Formatter:
    """The formatter of `log_format` ('plain': `inner` with the context; 'json': JsonFormatter)."""
    if log_format == JSON:
        return JsonFormatter()
    if log_format == PLAIN:
        return inner if isinstance(inner, PlainFormatter) else PlainFormatter(inner)
    raise ValueError(f'unknown log format {log_format!r} (one of {", ".join(FORMATS)})')


def use_format(log_format: str, handlers: Iterable[logging.Handler]) -> None:
    """Make these handlers write `log_format`, the plain format keeping each one's own layout."""
    for handler in handlers:
        handler.setFormatter(formatter_for(log_format, handler.formatter))
