"""Settings: defaults, environment overrides, file-over-environment precedence, clear errors."""
import dataclasses
from pathlib import Path

import pytest

from pacifica.cartd.config import check_volume, load_settings, parse_size
from pacifica.cartd.errors import ConfigError

PUBLISHED_CONFIG = """\
[cartd]
volume_path = /srv/cart/
lru_buffer_time = 3600
bundle_task = on

[archiveinterface]
url = http://archive.example:8080/

[celery]
broker_url = pyamqp://guest:guest@127.0.0.1:5672//
backend_url = rpc://

[database]
peewee_url = postgres://cartd:secret@127.0.0.1:5432/cartd
connect_attempts = 3
connect_wait = 2
"""


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    settings = load_settings(str(tmp_path / 'absent.ini'), environ={})
    assert settings.volume_path == Path('/tmp/')
    assert settings.transfer_size == 4 * 1024 * 1024
    assert settings.lru_purge is True and settings.bundle_task is False
    assert settings.archive_url == 'http://127.0.0.1:8080/'
    assert settings.broker_url == 'pyamqp://' and settings.backend_url == 'rpc://'
    assert settings.peewee_url == 'sqliteext:///db.sqlite3'
    assert (settings.database_connect_attempts, settings.database_connect_wait) == (10, 20)
    assert settings.config_file is None


def test_published_config_file_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / 'config.cfg'
    path.write_text(PUBLISHED_CONFIG)
    settings = load_settings(str(path), environ={})
    assert settings.volume_path == Path('/srv/cart/')
    assert settings.lru_buffer_time == 3600 and settings.bundle_task is True
    assert settings.archive_url == 'http://archive.example:8080/'
    assert settings.peewee_url.startswith('postgres://')
    assert settings.database_connect_attempts == 3
    assert settings.config_file == str(path)


def test_environment_overrides_defaults_and_file_wins_over_environment(tmp_path: Path) -> None:
    path = tmp_path / 'config.cfg'
    path.write_text('[cartd]\nvolume_path = /from/file\n')
    environ = {'VOLUME_PATH': '/from/env', 'TRANSFER_SIZE': '1 MB', 'ARCHIVE_INTERFACE_URL': 'http://127.0.0.1:9/a',
               'BUNDLE_TASK': 'yes', 'CARTD_CONFIG': str(path)}
    settings = load_settings(environ=environ)
    assert settings.volume_path == Path('/from/file')
    assert settings.transfer_size == 10**6
    assert settings.archive_url == 'http://127.0.0.1:9/a/'
    assert settings.bundle_task is True


@pytest.mark.parametrize('text, expected', [
    ('4 Mb', 4 * 1024**2), ('4 MB', 4 * 10**6), ('1.5 Kb', 1536), ('512 KiB', 512 * 1024), ('1000', 1000),
])
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize('section, key, value, env_name', [
    ('cartd', 'transfer_size', '4 parsecs', 'TRANSFER_SIZE'),
    ('cartd', 'bundle_task', 'maybe', 'BUNDLE_TASK'),
    ('database', 'connect_attempts', 'ten', 'DATABASE_CONNECT_ATTEMPTS'),
    ('archiveinterface', 'url', 'ftp://x/', 'ARCHIVE_INTERFACE_URL'),
])
def test_bad_value_names_the_key(tmp_path: Path, section: str, key: str, value: str, env_name: str) -> None:
    path = tmp_path / 'config.cfg'
    path.write_text(f'[{section}]\n{key} = {value}\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(str(path), environ={})
    assert f'[{section}] {key}' in caught.value.message
    assert env_name in caught.value.message


@pytest.mark.parametrize('volume, warned', [('/tmp/', True), ('/tmp', True), ('/var/tmp/', True), (None, False)])
def test_a_volume_left_on_a_shared_temporary_directory_is_warned_about(
        volume: str, warned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The default volume_path, /tmp/, works but is no place for production: the start says so."""
    monkeypatch.delenv('VOLUME_PATH', raising=False)
    settings = dataclasses.replace(load_settings(None), volume_path=Path(volume or tmp_path / 'volume'))
    with caplog.at_level('WARNING', logger='pacifica.cartd.config'):
        check_volume(settings)
    assert any('shared temporary directory' in record.getMessage() for record in caplog.records) == warned
