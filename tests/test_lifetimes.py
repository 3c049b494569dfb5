"""Cart lifetimes at the service level: the lifetime a cart gets, expiry as HEAD, GET and the status
document see it, the tombstones, the workers' sweep and eviction's order. The archive is
cartd_testkit.fakes' FakeArchive; time passing is set in the database (expires_date, deleted_date,
updated_date), as real hours cannot pass in a test."""
from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import pathlib
from typing import Callable, Iterator

import pytest

from pacifica.cartd.cartreport import FilesWanted
from pacifica.cartd.errors import CartExpired, CartNotFound
from pacifica.cartd.expiry import effective_lifetime
from pacifica.cartd.orm import Cart, now, oldest_evictable
from pacifica.cartd.service import CartService
from cartd_testkit.fakes import run_queue, sqlite_service

FILES = {'a': b'alpha bytes', 'b': b'beta bytes'}
Build = Callable[..., CartService]


@pytest.fixture
def make_service(tmp_path: pathlib.Path) -> Iterator[Build]:
    """A service on SQLite over FakeArchive(FILES), with these settings (environment names)."""
    with contextlib.ExitStack() as cleanup:
        yield functools.partial(sqlite_service, tmp_path, FILES, cleanup)


def _ready_cart(service: CartService, uid: str, **extra: object) -> Cart:
    entries = [{'id': name, 'path': name, 'hashtype': 'sha1', 'hashsum': hashlib.sha1(data).hexdigest()}
               for name, data in FILES.items()]
    cart_id = service.create_cart(uid, {'fileids': entries, **extra})
    run_queue(service, service.queue)  # type: ignore[arg-type]
    state = service.status(uid)
    assert state.status == 'ready', state.message
    return Cart.get_by_id(cart_id)


def _set(cart: Cart, **values: object) -> None:
    Cart.update(**values).where(Cart.id == cart.id).execute()


@pytest.mark.parametrize('requested, default, cap, lifetime', [
    (None, 0, 0, 0),  # as 0.7.0: for ever
    (None, 600, 0, 600),  # the default
    (30, 600, 0, 30),  # the POST's
    (0, 600, 0, 0),  # a POST may ask for for ever ...
    (0, 600, 3600, 3600),  # ... unless there is a cap
    (7200, 0, 3600, 3600),
    (None, 0, 3600, 3600),
])
def test_the_lifetime_a_cart_gets(make_service: Build, requested, default: int, cap: int, lifetime: int) -> None:
    settings = make_service(CART_LIFETIME=str(default), MAX_CART_LIFETIME=str(cap)).settings
    assert effective_lifetime(requested, settings) == lifetime


def test_the_default_lifetime_is_counted_from_ready(make_service: Build) -> None:
    service = make_service(CART_LIFETIME='600')
    cart = _ready_cart(service, 'd')
    assert (cart.lifetime, cart.expires_date - cart.ready_date) == (600, datetime.timedelta(seconds=600))
    state = service.status('d')
    assert (state.status, state.expired, state.expires) == ('ready', False, cart.expires_date)


def test_an_expired_cart_is_answered_410_until_its_tombstone_time_is_over(make_service: Build) -> None:
    service = make_service(TOMBSTONE_TIME='3600')
    cart = _ready_cart(service, 'e', lifetime=60)
    _set(cart, expires_date=now() - datetime.timedelta(seconds=1))
    state = service.status('e')
    assert (state.status, state.expired) == ('error', True)
    assert state.message.startswith('the cart expired at ')
    with pytest.raises(CartExpired) as expired:
        service.download('e', 'e.tar', 'e')
    assert expired.value.http_status == 410 and expired.value.message == state.message
    document = service.report('e', FilesWanted('none'))
    assert (document['status'], document['phase'], document['progress']['percent']) == ('error', 'expired', 100)

    _set(cart, expires_date=now() - datetime.timedelta(seconds=3601))  # expired longer ago than tombstone_time
    with pytest.raises(CartNotFound):
        service.status('e')
    with pytest.raises(CartNotFound):
        service.download('e', 'e.tar', 'e')
    with pytest.raises(CartNotFound):
        service.report('e', FilesWanted())
    assert service.delete('e') == 1  # the row is still there to delete


def test_the_sweep_removes_expired_carts_not_in_use_and_keeps_their_rows(make_service: Build) -> None:
    service = make_service()
    expired, in_use, forever = (_ready_cart(service, uid, **extra) for uid, extra in (
        ('x1', {'lifetime': 60}), ('x2', {'lifetime': 60}), ('x3', {})))
    long_ago = now() - datetime.timedelta(minutes=10)
    _set(expired, expires_date=now() - datetime.timedelta(seconds=5), updated_date=long_ago)
    _set(in_use, expires_date=now() - datetime.timedelta(seconds=5))  # used just now (it became ready)
    _set(forever, updated_date=long_ago)
    assert service.remove_expired() == 1
    assert Cart.get_by_id(expired.id).status == 'expired' and Cart.get_by_id(expired.id).deleted_date is not None
    assert not (service.volume.cart_dir(expired.id)).exists()
    assert not service.volume.link_path('x1').is_symlink()
    assert [Cart.get_by_id(cart.id).status for cart in (in_use, forever)] == ['ready', 'ready']
    assert service.volume.cart_dir(in_use.id).is_dir() and service.volume.cart_dir(forever.id).is_dir()
    assert service.status('x1').expired  # HEAD still answers 410
    assert service.remove_expired() == 0  # nothing twice


def test_a_deleted_cart_is_reported_until_its_tombstone_time_is_over(make_service: Build) -> None:
    service = make_service(TOMBSTONE_TIME='3600')
    cart = _ready_cart(service, 't')
    service.delete('t')
    document = service.report('t', FilesWanted('all'))
    assert (document['status'], document['phase']) == ('error', 'deleted')
    assert document['message'].startswith('the cart was deleted at ')
    assert [file['state'] for file in document['files']] == ['staged', 'staged']
    _set(cart, deleted_date=now() - datetime.timedelta(seconds=3601))
    with pytest.raises(CartNotFound):
        service.report('t', FilesWanted())


def test_eviction_takes_an_expired_cart_before_an_older_ready_one(make_service: Build) -> None:
    service = make_service()
    older, expired = _ready_cart(service, 'old'), _ready_cart(service, 'exp', lifetime=60)
    _set(older, updated_date=now() - datetime.timedelta(hours=5))
    _set(expired, updated_date=now() - datetime.timedelta(hours=1), expires_date=now() - datetime.timedelta(minutes=1))
    assert oldest_evictable(now()).cart_uid == 'exp'
    _set(expired, expires_date=now() + datetime.timedelta(minutes=1))  # not expired yet: least recently used first
    assert oldest_evictable(now()).cart_uid == 'old'


def test_fixit_stages_an_expired_cart_again_and_counts_its_lifetime_anew(make_service: Build) -> None:
    service = make_service()
    cart = _ready_cart(service, 'f', lifetime=60)
    _set(cart, expires_date=now() - datetime.timedelta(seconds=1), updated_date=now() - datetime.timedelta(hours=1))
    assert service.remove_expired() == 1 and service.status('f').expired
    service.fixit('f')
    again = Cart.get_by_id(cart.id)
    assert again.status == 'ready' and again.expires_date > now()
    assert not service.status('f').expired
    assert service.volume.cart_dir(cart.id).is_dir()  # its files are back


def test_files_of_carts_posted_by_0_7_0_never_expire(make_service: Build) -> None:
    service = make_service(CART_LIFETIME='60')
    cart = _ready_cart(service, 'old-client')
    _set(cart, lifetime=0, expires_date=None)  # as a 0.7.0 writer leaves it (server-side default)
    _set(cart, updated_date=now() - datetime.timedelta(days=30))
    assert service.remove_expired() == 0 and service.status('old-client').status == 'ready'
