"""logcontext: what a log line is about, and the plain and JSON formats that write it on every line."""
from __future__ import annotations

import io
import json
import logging
import threading
from typing import Iterator, List, Tuple

import pytest

from pacifica.cartd import logcontext
from pacifica.cartd.config import load_settings
from pacifica.cartd.logcontext import JsonFormatter, PlainFormatter, about, forget, settle, use_format

LINE = '%(levelname)s %(name)s: %(message)s'


@pytest.fixture
def captured() -> Iterator[Tuple[logging.Logger, logging.StreamHandler, io.StringIO]]:
    """A logger of its own with one handler writing to a string, in the plain format over LINE."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LINE))
    logger = logging.getLogger(f'test.logcontext.{id(stream)}')
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    forget()
    try:
        yield logger, handler, stream
    finally:
        logger.removeHandler(handler)
        forget()


def _lines(stream: io.StringIO) -> List[str]:
    return stream.getvalue().splitlines()


def test_plain_lines_end_with_the_cart_and_file_they_are_about(captured) -> None:
    logger, handler, stream = captured
    use_format('plain', [handler])
    logger.info('not about a cart')
    with about(cart_uid='run-7', cart_id=3):
        logger.info('cart %s created', 'run-7')
        with about(file_path='raw/a.dat', archive_id='1234'):
            logger.warning('recall requested')
        logger.info('back to the cart')
    logger.info('after')
    assert _lines(stream) == [
        'INFO %s: not about a cart' % logger.name,
        'INFO %s: cart run-7 created [cart=run-7]' % logger.name,
        'WARNING %s: recall requested [cart=run-7 file=raw/a.dat]' % logger.name,
        'INFO %s: back to the cart [cart=run-7]' % logger.name,
        'INFO %s: after' % logger.name,
    ]


def test_plain_values_that_could_be_misread_are_quoted_and_tracebacks_come_after(captured) -> None:
    logger, handler, stream = captured
    use_format('plain', [handler])
    use_format('plain', [handler])  # a second call does not append the context twice
    with about(cart_uid='a b', file_path='x]=y.dat'):
        try:
            raise RuntimeError('boom')
        except RuntimeError:
            logger.exception('failed')
    lines = _lines(stream)
    assert lines[0] == f'ERROR {logger.name}: failed [cart="a b" file="x]=y.dat"]'
    assert lines[1] == 'Traceback (most recent call last):' and lines[-1] == 'RuntimeError: boom'


def test_json_lines_carry_every_field_that_is_set(captured) -> None:
    logger, handler, stream = captured
    use_format('json', [handler])
    settle(task_id='t-1')
    with about(cart_uid='run-7', cart_id=3, file_path='raw/a.dat', archive_id='1234'):
        try:
            raise ValueError('bad hash')
        except ValueError:
            logger.error('file %s failed', 'raw/a.dat', exc_info=True)
    logger.info('plain "quotes" and ünïcode')
    first, second = (json.loads(line) for line in _lines(stream) if line.startswith('{'))
    assert {key: first[key] for key in ('level', 'logger', 'message', 'cart_uid', 'cart_id', 'file_path',
                                        'archive_id', 'task_id')} == {
        'level': 'ERROR', 'logger': logger.name, 'message': 'file raw/a.dat failed', 'cart_uid': 'run-7',
        'cart_id': 3, 'file_path': 'raw/a.dat', 'archive_id': '1234', 'task_id': 't-1'}
    assert first['exception'].startswith('Traceback') and first['exception'].endswith('ValueError: bad hash')
    assert first['time'][10] == 'T' and first['pid'] > 0 and first['thread'] == threading.current_thread().name
    assert second['message'] == 'plain "quotes" and ünïcode'
    assert second['task_id'] == 't-1' and 'cart_uid' not in second and 'exception' not in second
    assert len(_lines(stream)) == 2  # the traceback is inside the line, not after it


def test_each_thread_has_its_own_context(captured) -> None:
    logger, handler, stream = captured
    use_format('json', [handler])
    ready, go = threading.Barrier(2), threading.Event()

    def stage(path: str) -> None:
        with about(cart_uid='c', file_path=path):
            ready.wait(5)
            go.wait(5)
            logger.info('staged')

    threads = [threading.Thread(target=stage, args=(f'f{n}',)) for n in range(2)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join(5)
    logger.info('main thread')
    lines = [json.loads(line) for line in _lines(stream)]
    assert sorted(line.get('file_path', '-') for line in lines) == ['-', 'f0', 'f1']


def test_forget_ends_what_settle_began_and_unknown_fields_are_refused() -> None:
    forget()
    settle(task_id='t', cart_uid='c')
    assert logcontext.current() == {'task_id': 't', 'cart_uid': 'c'}
    with about(file_path='p', cart_uid=None):  # None leaves a field as it was
        assert logcontext.current() == {'task_id': 't', 'cart_uid': 'c', 'file_path': 'p'}
    assert logcontext.current() == {'task_id': 't', 'cart_uid': 'c'}
    forget()
    assert logcontext.current() == {}
    with pytest.raises(TypeError, match='not a log context field: cart'):
        with about(cart='x'):
            pass
    with pytest.raises(ValueError, match='unknown log format'):
        logcontext.formatter_for('xml')


def test_the_format_is_a_setting_checked_at_start(tmp_path) -> None:
    assert load_settings(str(tmp_path / 'none.ini'), environ={}).log_format == 'plain'
    assert load_settings(str(tmp_path / 'none.ini'), environ={'LOG_FORMAT': 'JSON'}).log_format == 'json'
    with pytest.raises(Exception, match=r'\[cartd\] log_format \(env LOG_FORMAT\): not one of plain, json'):
        load_settings(str(tmp_path / 'none.ini'), environ={'LOG_FORMAT': 'xml'})


def test_plain_formatter_keeps_the_layout_it_wraps() -> None:
    record = logging.makeLogRecord({'msg': 'hello %s', 'args': ('x',), 'levelname': 'INFO', 'name': 'n'})
    with about(cart_uid='u'):
        assert PlainFormatter(logging.Formatter('<%(message)s>')).format(record) == '<hello x [cart=u]>'
        assert json.loads(JsonFormatter().format(record))['cart_uid'] == 'u'
    assert record.getMessage() == 'hello x'  # the record other handlers see is unchanged
