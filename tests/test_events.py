"""Completion events at the service level, on a temp SQLite file: the outbox row written with the status change
(ready, error, expired), nothing without [notifications], the two formats, delivery to a real HTTP receiver
(cartd_testkit.receiver) with its lease and doubling backoff, giving up, and the callback URL's prefix check.
The archive is cartd_testkit.fakes' FakeArchive; time passing is set in the database (next_attempt, created)."""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import pathlib
from typing import Callable, Iterator, List

import pytest

from pacifica.cartd.config import load_settings
from pacifica.cartd.errors import BadRequest, ConfigError
from pacifica.cartd.events import render, under_prefix
from pacifica.cartd.orm import Cart, CartEvent, now
from pacifica.cartd.service import CartService
from cartd_testkit.fakes import run_queue, sqlite_service
from cartd_testkit.receiver import EventReceiver

FILES = {'a': b'alpha bytes', 'b': b'beta bytes'}
Build = Callable[..., CartService]


@pytest.fixture
def receiver() -> Iterator[EventReceiver]:
    """A real HTTP receiver on 127.0.0.1."""
    with EventReceiver() as running:
        yield running


@pytest.fixture
def make_service(tmp_path: pathlib.Path) -> Iterator[Build]:
    """A service on SQLite over FakeArchive(FILES), with these settings (environment names)."""
    with contextlib.ExitStack() as cleanup:
        yield functools.partial(sqlite_service, tmp_path, FILES, cleanup)


def _post(service: CartService, uid: str, wrong_hash: bool = False, **extra: object) -> int:
    entries = [{'id': name, 'path': name, 'hashtype': 'sha1',
                'hashsum': hashlib.sha1(b'other' if wrong_hash else data).hexdigest()}
               for name, data in FILES.items()]
    cart_id = service.create_cart(uid, {'fileids': entries, **extra})
    run_queue(service, service.queue)  # type: ignore[arg-type]
    return cart_id


def _events() -> List[CartEvent]:
    return list(CartEvent.select().order_by(CartEvent.id))


def test_without_notifications_no_event_is_written(make_service: Build) -> None:
    service = make_service()
    _post(service, 'quiet')
    _post(service, 'quiet-bad', wrong_hash=True)
    assert service.status('quiet').status == 'ready' and service.status('quiet-bad').status == 'error'
    assert _events() == []
    assert service.deliver_events() == 0


def test_ready_error_and_expired_each_write_one_event(make_service: Build, receiver: EventReceiver) -> None:
    service = make_service(NOTIFICATIONS_URL=receiver.url + 'all')
    _post(service, 'good', lifetime=60)
    _post(service, 'bad', wrong_hash=True)
    assert [(event.event_type, event.subject) for event in _events()] == [
        ('org.pacifica.cartd.cart.ready', 'good'), ('org.pacifica.cartd.cart.error', 'bad')]
    ready, error = (json.loads(event.data) for event in _events())
    assert (ready['status'], ready['phase'], ready['uid']) == ('ready', 'ready', 'good')
    assert (error['status'], error['phase']) == ('error', 'error') and 'hash' in error['message'].lower()
    assert 'files' not in ready and 'files_page' not in ready
    assert ready['progress']['files_staged'] == 2

    Cart.update(expires_date=now() - datetime.timedelta(seconds=1),
                updated_date=now() - datetime.timedelta(minutes=10)).where(Cart.cart_uid == 'good').execute()
    assert service.remove_expired() == 1
    assert service.remove_expired() == 0  # expired once, one event
    expired = _events()[-1]
    assert (expired.event_type, expired.subject, len(_events())) == ('org.pacifica.cartd.cart.expired', 'good', 3)
    assert json.loads(expired.data)['phase'] == 'expired'

    # The data is what it was when the event was written: a delete later does not change it.
    service.delete('bad')
    assert service.deliver_events() == 3
    bodies = receiver.bodies()
    assert [(body['type'], body['subject']) for body in bodies] == [
        ('org.pacifica.cartd.cart.ready', 'good'), ('org.pacifica.cartd.cart.error', 'bad'),
        ('org.pacifica.cartd.cart.expired', 'good')]
    assert bodies[1]['data'] == error
    assert {event.state for event in _events()} == {'delivered'}
    assert service.deliver_events() == 0  # delivered once


def test_the_event_and_the_status_change_commit_together(make_service: Build, receiver: EventReceiver,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An outbox insert that fails (a fault no real database shows on demand: patched in) leaves the cart
    bundling, not ready without its event; the reconciler re-drives it later."""
    from pacifica.cartd import events
    service = make_service(NOTIFICATIONS_URL=receiver.url)

    def broken(*_args: object) -> None:
        raise RuntimeError('outbox insert failed')

    monkeypatch.setattr(events, 'insert_events', broken)
    with pytest.raises(RuntimeError):
        _post(service, 'atomic')
    assert Cart.get(Cart.cart_uid == 'atomic').status == 'bundling' and _events() == []
    monkeypatch.undo()
    service.bundle(Cart.get(Cart.cart_uid == 'atomic').id)
    assert service.status('atomic').status == 'ready' and [event.subject for event in _events()] == ['atomic']


def test_the_cloudevents_body(make_service: Build, receiver: EventReceiver) -> None:
    service = make_service(NOTIFICATIONS_URL=receiver.url + 'hook?x=1', NOTIFICATIONS_SOURCE='https://cart.example/')
    _post(service, 'ce')
    assert service.deliver_events() == 1
    [request] = receiver.requests
    assert request['path'] == '/hook?x=1'
    assert request['headers']['content-type'] == 'application/cloudevents+json'
    body = request['body']
    assert set(body) == {'specversion', 'id', 'source', 'type', 'subject', 'time', 'datacontenttype', 'data'}
    assert (body['specversion'], body['source'], body['datacontenttype']) == ('1.0', 'https://cart.example/',
                                                                              'application/json')
    assert body['id'] == _events()[0].event_id and len(body['id']) == 36
    assert datetime.datetime.fromisoformat(body['time'].replace('Z', '+00:00')).tzinfo is not None
    assert body['data']['status'] == 'ready'


def test_the_pacifica_notifications_body(make_service: Build, receiver: EventReceiver) -> None:
    service = make_service(NOTIFICATIONS_URL=receiver.url, NOTIFICATIONS_FORMAT='pacifica')
    _post(service, 'pn')
    service.deliver_events()
    [request] = receiver.requests
    assert request['headers']['content-type'] == 'application/json'
    body = request['body']
    assert (body['cloudEventsVersion'], body['eventType'], body['source']) == (
        '0.1', 'org.pacifica.cartd.cart.ready', '/pacifica/cartd')
    assert body['eventID'] == _events()[0].event_id and body['data']['uid'] == 'pn'
    assert {'eventTime', 'contentType'} <= set(body)


def _make_due() -> None:
    CartEvent.update(next_attempt=now() - datetime.timedelta(seconds=1)).execute()


def test_a_failing_receiver_gets_the_event_again_later_with_the_same_id(make_service: Build,
                                                                          receiver: EventReceiver) -> None:
    service = make_service(NOTIFICATIONS_URL=receiver.url, NOTIFICATIONS_RETRY_WAIT='10',
                           NOTIFICATIONS_RETRY_WAIT_MAX='35')
    _post(service, 'retry')
    receiver.status = 500
    waits = []
    for _ in range(4):
        before = now()
        assert service.deliver_events() == 0
        [event] = _events()
        waits.append(round((event.next_attempt - before).total_seconds()))
        assert service.deliver_events() == 0  # not due yet: not sent again
        _make_due()
    assert waits == [10, 20, 35, 35]  # doubling, capped
    assert event.attempts == 4 and 'answered 500' in event.last_error and event.state == 'pending'
    receiver.status = 204
    assert service.deliver_events() == 1
    assert [body['id'] for body in receiver.bodies()] == [event.event_id]
    assert [record['body']['id'] for record in receiver.refused] == [event.event_id] * 4


def test_a_receiver_that_is_down_gets_the_event_when_it_is_up(make_service: Build) -> None:
    receiver = EventReceiver()  # not listening yet: connections are refused
    service = make_service(NOTIFICATIONS_URL=receiver.url, NOTIFICATIONS_TIMEOUT='2')
    _post(service, 'down')
    assert service.deliver_events() == 0
    [event] = _events()
    assert event.attempts == 1 and 'Connection' in event.last_error
    with receiver:
        _make_due()
        assert service.deliver_events() == 1
        assert [body['id'] for body in receiver.bodies('down')] == [event.event_id]


def test_a_claimed_event_is_left_to_its_sender_until_the_lease_is_over(make_service: Build,
                                                                        receiver: EventReceiver) -> None:
    """A sender killed mid-send cannot be shown at this level: claiming without sending stands in for it."""
    from pacifica.cartd.orm import claim_event, due_events
    service = make_service(NOTIFICATIONS_URL=receiver.url, NOTIFICATIONS_TIMEOUT='3')
    _post(service, 'lease')
    [found] = due_events(now(), 10)
    assert claim_event(found, now() + datetime.timedelta(seconds=8))
    assert not claim_event(found, now() + datetime.timedelta(seconds=8))  # a second sender loses
    assert service.deliver_events() == 0 and receiver.bodies() == []
    _make_due()  # the lease ran out
    assert service.deliver_events() == 1
    assert _events()[0].attempts == 2


def test_an_event_is_given_up_after_give_up_after(make_service: Build) -> None:
    receiver = EventReceiver()  # never up
    service = make_service(NOTIFICATIONS_URL=receiver.url, NOTIFICATIONS_GIVE_UP_AFTER='60')
    _post(service, 'lost')
    service.deliver_events()
    assert _events()[0].state == 'pending'
    CartEvent.update(created=now() - datetime.timedelta(seconds=61)).execute()
    _make_due()
    service.deliver_events()
    assert _events()[0].state == 'abandoned'
    _make_due()
    assert service.deliver_events() == 0 and _events()[0].attempts == 2


def test_finished_events_are_removed_after_tombstone_time(make_service: Build, receiver: EventReceiver) -> None:
    service = make_service(NOTIFICATIONS_URL=receiver.url, TOMBSTONE_TIME='3600')
    _post(service, 'old')
    _post(service, 'new')
    _post(service, 'pending')
    assert service.deliver_events() == 3
    CartEvent.update(created=now() - datetime.timedelta(seconds=3601)).where(
        CartEvent.subject.in_(['old', 'pending'])).execute()
    CartEvent.update(state='pending', next_attempt=now() + datetime.timedelta(hours=1)).where(
        CartEvent.subject == 'pending').execute()  # as if not sent yet: kept however old
    service.deliver_events()
    assert len(_events()) == 3  # looked for once a minute, not at every pass
    service.delivery._dropped_at = None
    service.deliver_events()
    assert sorted(event.subject for event in _events()) == ['new', 'pending']


@pytest.mark.parametrize('url, allowed', [
    ('http://allowed.example.com/hooks', True),
    ('http://allowed.example.com/hooks/', True),
    ('http://allowed.example.com/hooks/cart?x=1', True),
    ('http://ALLOWED.example.com:80/hooks/a', True),
    ('http://allowed.example.com/hooksx', False),
    ('http://allowed.example.com/', False),
    ('http://allowed.example.com.evil.org/hooks', False),
    ('http://allowed.example.com:8080/hooks', False),
    ('https://allowed.example.com/hooks', False),
    ('http://user@allowed.example.com/hooks', False),
    ('http://evil.org@allowed.example.com/hooks', False),
    ('http://allowed.example.com/hooks/../admin', False),
    ('http://allowed.example.com/hooks/%2e%2e/admin', False),
    ('ftp://allowed.example.com/hooks', False),
    ('http://allowed.example.com:notaport/hooks', False),
])
def test_callback_prefixes(url: str, allowed: bool) -> None:
    assert under_prefix(url, 'http://allowed.example.com/hooks') is allowed


def test_a_callback_goes_with_the_configured_url_and_is_checked(make_service: Build, receiver: EventReceiver) -> None:
    service = make_service(NOTIFICATIONS_URL=receiver.url + 'all',
                           NOTIFICATIONS_CALLBACK_PREFIXES=f'https://other.example/ {receiver.url}carts/')
    with pytest.raises(BadRequest) as refused:
        _post(service, 'evil', callback_url=f'http://127.0.0.1:{receiver.port}.evil.org/carts/x')
    assert refused.value.http_status == 400 and 'callback_url' in refused.value.message
    _post(service, 'cb', callback_url=receiver.url + 'carts/cb')
    assert sorted(event.target_url for event in _events()) == [receiver.url + 'all', receiver.url + 'carts/cb']
    assert len({event.event_id for event in _events()}) == 1  # one event, to two targets
    assert service.deliver_events() == 2
    assert sorted(record['path'] for record in receiver.requests) == ['/all', '/carts/cb']


def test_no_callback_is_accepted_without_prefixes(make_service: Build) -> None:
    service = make_service(NOTIFICATIONS_URL='http://127.0.0.1:9/')
    with pytest.raises(BadRequest) as refused:
        _post(service, 'nocb', callback_url='http://127.0.0.1:9/')
    assert 'accepts no callback URLs' in refused.value.message


@pytest.mark.parametrize('key, env, value', [
    ('url', 'NOTIFICATIONS_URL', 'ftp://x/'),
    ('callback_prefixes', 'NOTIFICATIONS_CALLBACK_PREFIXES', 'http://ok/ notaurl'),
    ('format', 'NOTIFICATIONS_FORMAT', 'xml'),
    ('timeout', 'NOTIFICATIONS_TIMEOUT', '0'),
    ('retry_wait', 'NOTIFICATIONS_RETRY_WAIT', '-1'),
])
def test_bad_notification_settings_name_the_key(tmp_path: pathlib.Path, key: str, env: str, value: str) -> None:
    path = tmp_path / 'config.cfg'
    path.write_text(f'[notifications]\n{key} = {value}\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), environ={})
    assert f'[notifications] {key}' in caught.value.message and env in caught.value.message


def test_render_keeps_the_stored_id(make_service: Build, receiver: EventReceiver) -> None:
    service = make_service(NOTIFICATIONS_URL=receiver.url)
    _post(service, 'same')
    [event] = _events()
    first, _ = render(event, service.settings)
    again, _ = render(event, service.settings)
    assert json.loads(first)['id'] == json.loads(again)['id'] == event.event_id
