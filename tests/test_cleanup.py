"""cleanup.cart_went_away on a temp SQLite file: what it removes from the volume, and when it leaves everything alone."""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Iterator, List

import pytest

from pacifica.cartd import database, schema
from pacifica.cartd.cleanup import cart_went_away
from pacifica.cartd.config import check_volume, load_settings
from pacifica.cartd.orm import Cart, CartStatus, delete_cart_rows, insert_cart, mark_deleted
from pacifica.cartd.volume import CartVolume

UID = 'shared-uid'


@pytest.fixture
def volume(tmp_path: pathlib.Path) -> Iterator[CartVolume]:
    settings = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(tmp_path / 'volume'), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3'})
    check_volume(settings)
    database.bind(settings)
    with database.connection():
        schema.sync()
        yield CartVolume(settings.volume_path)


def new_cart(volume: CartVolume, uid: str = UID) -> int:
    """A cart row with a staged file, a partial download and a tar on the volume."""
    cart_id, _ = insert_cart(uid, False, [('a1', 'dir/file.txt', 'md5', '0' * 32)], 0)
    files = volume.files_dir(cart_id, uid)
    (files / 'dir').mkdir(parents=True)
    (files / 'dir' / 'file.txt').write_bytes(b'staged bytes')
    volume.partial_path(cart_id, 1).write_bytes(b'half')
    volume.tar_path(cart_id, uid).write_bytes(b'tar')
    return cart_id


def link_target(volume: CartVolume, uid: str = UID) -> pathlib.Path:
    link = volume.link_path(uid)
    return pathlib.Path(os.path.normpath(os.path.join(link.parent, os.readlink(link))))


def tree(root: pathlib.Path) -> List[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob('*'))


@pytest.mark.parametrize('status', [status.value for status in CartStatus if status != CartStatus.DELETED])
def test_a_live_cart_is_left_alone(volume: CartVolume, caplog: pytest.LogCaptureFixture, status: str) -> None:
    cart_id = new_cart(volume)
    Cart.update(status=status).where(Cart.id == cart_id).execute()
    volume.link_ready_cart(UID, volume.files_dir(cart_id, UID))
    before = tree(volume.root)
    with caplog.at_level(logging.DEBUG, logger='pacifica.cartd.cleanup'):
        assert cart_went_away(volume, cart_id, UID, 'staging') is False
    assert tree(volume.root) == before
    assert link_target(volume) == volume.files_dir(cart_id, UID)
    assert [record for record in caplog.records if record.name == 'pacifica.cartd.cleanup'] == []


def assert_logged_once(caplog: pytest.LogCaptureFixture, uid: str, during: str) -> None:
    records = [record for record in caplog.records if record.name == 'pacifica.cartd.cleanup']
    assert len(records) == 1
    assert records[0].levelno == logging.INFO
    assert uid in records[0].getMessage() and during in records[0].getMessage()


def test_a_deleted_cart_loses_its_directory_and_link(volume: CartVolume, caplog: pytest.LogCaptureFixture) -> None:
    cart_id = new_cart(volume)
    volume.link_ready_cart(UID, volume.files_dir(cart_id, UID))
    mark_deleted([cart_id])
    with caplog.at_level(logging.INFO, logger='pacifica.cartd.cleanup'):
        assert cart_went_away(volume, cart_id, UID, 'bundling') is True
    assert not volume.cart_dir(cart_id).exists()
    assert not os.path.lexists(volume.link_path(UID))
    assert_logged_once(caplog, UID, 'bundling')


def test_a_purged_cart_loses_its_directory_and_link(volume: CartVolume, caplog: pytest.LogCaptureFixture) -> None:
    cart_id = new_cart(volume)
    volume.link_ready_cart(UID, volume.tar_path(cart_id, UID))  # a bundle's link points at its tar
    delete_cart_rows(cart_id)
    with caplog.at_level(logging.INFO, logger='pacifica.cartd.cleanup'):
        assert cart_went_away(volume, cart_id, UID, 'becoming ready') is True
    assert not volume.cart_dir(cart_id).exists()
    assert not os.path.lexists(volume.link_path(UID))
    assert_logged_once(caplog, UID, 'becoming ready')


def test_a_link_into_another_cart_of_the_uid_stays(volume: CartVolume, caplog: pytest.LogCaptureFixture) -> None:
    gone = new_cart(volume)
    kept = new_cart(volume)
    Cart.update(status=CartStatus.READY.value).where(Cart.id == kept).execute()
    volume.link_ready_cart(UID, volume.files_dir(kept, UID))
    mark_deleted([gone])
    kept_tree = tree(volume.cart_dir(kept))
    with caplog.at_level(logging.INFO, logger='pacifica.cartd.cleanup'):
        assert cart_went_away(volume, gone, UID, 'staging') is True
    assert not volume.cart_dir(gone).exists()
    assert link_target(volume) == volume.files_dir(kept, UID)
    assert tree(volume.cart_dir(kept)) == kept_tree
    assert_logged_once(caplog, UID, 'staging')


def test_other_carts_are_untouched(volume: CartVolume) -> None:
    gone = new_cart(volume)
    other = new_cart(volume, 'other-uid')
    volume.link_ready_cart('other-uid', volume.files_dir(other, 'other-uid'))
    before = tree(volume.cart_dir(other))
    delete_cart_rows(gone)
    assert cart_went_away(volume, gone, UID, 'staging') is True
    assert tree(volume.cart_dir(other)) == before
    assert link_target(volume, 'other-uid') == volume.files_dir(other, 'other-uid')


def test_a_deleted_cart_with_nothing_on_disk_is_no_error(volume: CartVolume) -> None:
    cart_id, _ = insert_cart(UID, False, [], 0)
    mark_deleted([cart_id])
    assert cart_went_away(volume, cart_id, UID, 'staging') is True
    assert not volume.cart_dir(cart_id).exists()
    # a row that never existed counts as gone too
    assert cart_went_away(volume, cart_id + 100, UID, 'staging') is True
