"""Read the service's INI file and environment once into one frozen, typed settings object."""
from __future__ import annotations

import configparser
import dataclasses
import logging
import os
import urllib.parse
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

from .errors import ConfigError

LOGGER = logging.getLogger(__name__)
SHARED_TEMPORARY_DIRECTORIES = (Path('/tmp'), Path('/var/tmp'))

# Sizes as the published service writes them: upper-case units are decimal,
# lower-case 'b' units binary ("4 Mb" is 4 MiB). The IEC names are accepted too.
SIZE_UNITS: Dict[str, int] = {
    'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
    'b': 1, 'Kb': 1024, 'Mb': 1024**2, 'Gb': 1024**3, 'Tb': 1024**4,
    'KiB': 1024, 'MiB': 1024**2, 'GiB': 1024**3, 'TiB': 1024**4,
}

TRUE_WORDS = frozenset(('1', 'yes', 'true', 'on'))
FALSE_WORDS = frozenset(('0', 'no', 'false', 'off'))
LOG_FORMATS = ('plain', 'json')  # logcontext.FORMATS


@dataclasses.dataclass(frozen=True)
class Option:
    """One INI key: its section, environment variable and default text."""

    section: str
    key: str
    env: str
    default: str


# Every key the service reads. The environment variable gives the default and the
# file, when it sets the key, wins (the published service's precedence).
OPTIONS: Tuple[Option, ...] = (
    Option('cartd', 'volume_path', 'VOLUME_PATH', '/tmp/'),
    Option('cartd', 'lru_buffer_time', 'LRU_BUFFER_TIME', '0'),
    Option('cartd', 'lru_purge', 'LRU_PURGE', 'on'),
    Option('cartd', 'bundle_task', 'BUNDLE_TASK', 'off'),
    Option('cartd', 'transfer_size', 'TRANSFER_SIZE', '4 Mb'),
    Option('cartd', 'stage_concurrency', 'STAGE_CONCURRENCY', '8'),
    Option('cartd', 'stage_batch_size', 'STAGE_BATCH_SIZE', '32'),
    Option('cartd', 'max_request_size', 'MAX_REQUEST_SIZE', '100 Mb'),
    Option('cartd', 'stall_timeout', 'STALL_TIMEOUT', '600'),
    Option('cartd', 'reconcile_interval', 'RECONCILE_INTERVAL', '60'),
    Option('cartd', 'x_accel_redirect', 'X_ACCEL_REDIRECT', ''),
    Option('cartd', 'cart_lifetime', 'CART_LIFETIME', '0'),
    Option('cartd', 'max_cart_lifetime', 'MAX_CART_LIFETIME', '0'),
    Option('cartd', 'tombstone_time', 'TOMBSTONE_TIME', '604800'),
    Option('cartd', 'worker_heartbeat', 'WORKER_HEARTBEAT', '10'),
    Option('cartd', 'log_format', 'LOG_FORMAT', 'plain'),
    Option('cartd', 'share_staged_files', 'SHARE_STAGED_FILES', 'on'),
    Option('archiveinterface', 'url', 'ARCHIVE_INTERFACE_URL', 'http://127.0.0.1:8080/'),
    Option('archiveinterface', 'timeout', 'ARCHIVE_INTERFACE_TIMEOUT', '60'),
    Option('archiveinterface', 'retries', 'ARCHIVE_INTERFACE_RETRIES', '4'),
    Option('archiveinterface', 'retry_wait', 'ARCHIVE_INTERFACE_RETRY_WAIT', '1'),
    Option('archiveinterface', 'tape_wait', 'ARCHIVE_INTERFACE_TAPE_WAIT', '5'),
    Option('archiveinterface', 'tape_wait_max', 'ARCHIVE_INTERFACE_TAPE_WAIT_MAX', '300'),
    Option('celery', 'broker_url', 'BROKER_URL', 'pyamqp://'),
    Option('celery', 'backend_url', 'BACKEND_URL', 'rpc://'),
    Option('celery', 'queue', 'CELERY_QUEUE', 'celery'),
    Option('database', 'peewee_url', 'PEEWEE_URL', 'sqliteext:///db.sqlite3'),
    Option('database', 'connect_attempts', 'DATABASE_CONNECT_ATTEMPTS', '10'),
    Option('database', 'connect_wait', 'DATABASE_CONNECT_WAIT', '20'),
    Option('database', 'debug_logging', 'DATABASE_DEBUG_LOGGING', 'False'),
    Option('notifications', 'url', 'NOTIFICATIONS_URL', ''),
    Option('notifications', 'callback_prefixes', 'NOTIFICATIONS_CALLBACK_PREFIXES', ''),
    Option('notifications', 'format', 'NOTIFICATIONS_FORMAT', 'cloudevents'),
    Option('notifications', 'source', 'NOTIFICATIONS_SOURCE', '/pacifica/cartd'),
    Option('notifications', 'timeout', 'NOTIFICATIONS_TIMEOUT', '10'),
    Option('notifications', 'interval', 'NOTIFICATIONS_INTERVAL', '1'),
    Option('notifications', 'retry_wait', 'NOTIFICATIONS_RETRY_WAIT', '1'),
    Option('notifications', 'retry_wait_max', 'NOTIFICATIONS_RETRY_WAIT_MAX', '300'),
    Option('notifications', 'give_up_after', 'NOTIFICATIONS_GIVE_UP_AFTER', '604800'),
    Option('metrics', 'enabled', 'METRICS_ENABLED', 'on'),
    Option('metrics', 'multiprocess_dir', 'METRICS_MULTIPROCESS_DIR', ''),
    Option('metrics', 'worker_port', 'METRICS_WORKER_PORT', '0'),
    Option('metrics', 'worker_address', 'METRICS_WORKER_ADDRESS', '127.0.0.1'),
)

CONFIG_ENV = 'CARTD_CONFIG'
CPCONFIG_ENV = 'CARTD_CPCONFIG'


def default_config_path(environ: Mapping[str, str]) -> str:
    """Return the service INI file named by CARTD_CONFIG, or the per-user default."""
    return environ.get(CONFIG_ENV, os.path.join(os.path.expanduser('~'), '.pacifica-cartd', 'config.ini'))


def default_cpconfig_path(environ: Mapping[str, str]) -> str:
    """Return the CherryPy config file named by CARTD_CPCONFIG, or the per-user default."""
    return environ.get(CPCONFIG_ENV, os.path.join(os.path.expanduser('~'), '.pacifica-cartd', 'cpconfig.ini'))


def parse_size(text: str) -> int:
    """Parse '4 Mb', '1.5 GB', '512 KiB' or a bare byte count into bytes."""
    parts = text.split()
    if len(parts) == 1 and parts[0].isdigit():
        return int(parts[0])
    if len(parts) != 2 or parts[1] not in SIZE_UNITS:
        raise ValueError(f'not a size: {text!r} (use "<number> <unit>", unit one of {", ".join(SIZE_UNITS)})')
    try:
        number = float(parts[0])
    except ValueError as exc:
        raise ValueError(f'not a size: {text!r}') from exc
    if number < 0:
        raise ValueError(f'negative size: {text!r}')
    return int(number * SIZE_UNITS[parts[1]])


def parse_bool(text: str) -> bool:
    """Parse the words configparser accepts as booleans."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f'not a boolean: {text!r} (use on/off, true/false, yes/no or 1/0)')


def _one_of(text: str, words: Tuple[str, ...]) -> str:
    word = text.strip().lower()
    if word not in words:
        raise ValueError(f'not one of {", ".join(words)}: {text!r}')
    return word


def _non_negative(parse: Callable[[str], float], strictly: bool = False) -> Callable[[str], float]:
    """`parse`, refusing values below 0 (and 0 itself when `strictly`)."""
    def check(text: str) -> float:
        value = parse(text)
        if value < 0 or (strictly and value == 0):
            raise ValueError(f'must be more than 0: {text!r}' if strictly else f'must not be negative: {text!r}')
        return value
    return check


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f'must be at least 1: {text!r}')
    return value


def _url_with_slash(text: str) -> str:
    url = text.strip()
    if not url.startswith(('http://', 'https://')):
        raise ValueError(f'not an http(s) URL: {text!r}')
    return url if url.endswith('/') else url + '/'


def _uri_prefix(text: str) -> str:
    """Empty (off), or a URI path that starts and ends with '/'."""
    prefix = text.strip()
    if prefix and not (prefix.startswith('/') and prefix.endswith('/') and ' ' not in prefix):
        raise ValueError(f'not a URI path starting and ending with "/": {text!r}')
    return prefix


def _optional_url(text: str) -> str:
    """Empty (off), or an http(s) URL naming a host."""
    url = text.strip()
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ('http', 'https') or not parts.hostname or parts.username is not None:
            raise ValueError(f'not an http(s) URL with a host and no user name: {text!r}')
    return url


def _url_list(text: str) -> Tuple[str, ...]:
    """URLs separated by white space (none: empty)."""
    return tuple(_optional_url(word) for word in text.split())


EVENT_FORMATS = ('cloudevents', 'pacifica')


def _uri_reference(text: str) -> str:
    """A non-empty URI reference without white space (a CloudEvents source)."""
    value = text.strip()
    if not value or any(char.isspace() for char in value):
        raise ValueError(f'not a URI reference: {text!r}')
    return value


def _optional_absolute_path(text: str) -> Optional[Path]:
    """Empty (None), or an absolute directory path."""
    path = text.strip()
    if path and not os.path.isabs(path):
        raise ValueError(f'not an absolute path: {text!r}')
    return Path(path) if path else None


def _port(text: str) -> int:
    """A TCP port, or 0 (off)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f'not a port (0 to 65535): {text!r}')
    return value


FILESYSTEM_BROKER = 'filesystem://'


def _broker_url(text: str) -> str:
    """A broker URL; kombu's filesystem transport needs the absolute directory it shares (filesystem:///dir)."""
    url = text.strip()
    if url.split(':', 1)[0] == 'filesystem' and not url.startswith(FILESYSTEM_BROKER + '/'):
        raise ValueError(f'a filesystem broker names an absolute directory, as in filesystem:///var/lib/cartd/broker, '
                         f'not {text!r}')
    return url


def filesystem_broker_dir(broker_url: str) -> Optional[Path]:
    """The directory of a filesystem:///dir broker URL, or None for a broker server."""
    if not broker_url.startswith(FILESYSTEM_BROKER):
        return None
    return Path(broker_url[len(FILESYSTEM_BROKER):])


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the service is configured with, parsed and checked."""

    volume_path: Path
    lru_buffer_time: float
    lru_purge: bool
    bundle_task: bool
    transfer_size: int
    stage_concurrency: int
    stage_batch_size: int
    max_request_size: int
    stall_timeout: float
    reconcile_interval: float
    x_accel_redirect: str
    cart_lifetime: int
    max_cart_lifetime: int
    tombstone_time: float
    worker_heartbeat: float
    log_format: str
    archive_url: str
    archive_timeout: float
    archive_retries: int
    archive_retry_wait: float
    archive_tape_wait: float
    archive_tape_wait_max: float
    broker_url: str
    backend_url: str
    celery_queue: str
    peewee_url: str
    database_connect_attempts: int
    database_connect_wait: float
    database_debug_logging: bool
    notifications_url: str = ''
    notifications_callback_prefixes: Tuple[str, ...] = ()
    notifications_format: str = 'cloudevents'
    notifications_source: str = '/pacifica/cartd'
    notifications_timeout: float = 10.0
    notifications_interval: float = 1.0
    notifications_retry_wait: float = 1.0
    notifications_retry_wait_max: float = 300.0
    notifications_give_up_after: float = 604800.0
    metrics_enabled: bool = True
    metrics_multiprocess_dir: Optional[Path] = None
    metrics_worker_port: int = 0
    metrics_worker_address: str = '127.0.0.1'
    share_staged_files: bool = True
    config_file: Optional[str] = None

    @property
    def notifications_on(self) -> bool:
        """Whether any cart can have events to send: a URL for all, or prefixes callbacks may use."""
        return bool(self.notifications_url or self.notifications_callback_prefixes)


# (section, key) -> (Settings field, parser)
_FIELDS: Dict[Tuple[str, str], Tuple[str, Callable[[str], object]]] = {
    ('cartd', 'volume_path'): ('volume_path', lambda text: Path(text.strip())),
    ('cartd', 'lru_buffer_time'): ('lru_buffer_time', _non_negative(float)),
    ('cartd', 'lru_purge'): ('lru_purge', parse_bool),
    ('cartd', 'bundle_task'): ('bundle_task', parse_bool),
    ('cartd', 'transfer_size'): ('transfer_size', lambda text: _positive_int(str(parse_size(text)))),
    ('cartd', 'stage_concurrency'): ('stage_concurrency', _positive_int),
    ('cartd', 'stage_batch_size'): ('stage_batch_size', _positive_int),
    ('cartd', 'max_request_size'): ('max_request_size', lambda text: _positive_int(str(parse_size(text)))),
    ('cartd', 'stall_timeout'): ('stall_timeout', _non_negative(float)),
    ('cartd', 'reconcile_interval'): ('reconcile_interval', _non_negative(float)),
    ('cartd', 'x_accel_redirect'): ('x_accel_redirect', _uri_prefix),
    ('cartd', 'cart_lifetime'): ('cart_lifetime', _non_negative(int)),
    ('cartd', 'max_cart_lifetime'): ('max_cart_lifetime', _non_negative(int)),
    ('cartd', 'tombstone_time'): ('tombstone_time', _non_negative(float)),
    ('cartd', 'worker_heartbeat'): ('worker_heartbeat', _non_negative(float)),
    ('cartd', 'log_format'): ('log_format', lambda text: _one_of(text, LOG_FORMATS)),
    ('cartd', 'share_staged_files'): ('share_staged_files', parse_bool),
    ('archiveinterface', 'url'): ('archive_url', _url_with_slash),
    ('archiveinterface', 'timeout'): ('archive_timeout', _non_negative(float)),
    ('archiveinterface', 'retries'): ('archive_retries', _non_negative(int)),
    ('archiveinterface', 'retry_wait'): ('archive_retry_wait', _non_negative(float)),
    ('archiveinterface', 'tape_wait'): ('archive_tape_wait', _non_negative(float)),
    ('archiveinterface', 'tape_wait_max'): ('archive_tape_wait_max', _non_negative(float)),
    ('celery', 'broker_url'): ('broker_url', _broker_url),
    ('celery', 'backend_url'): ('backend_url', str.strip),
    ('celery', 'queue'): ('celery_queue', str.strip),
    ('database', 'peewee_url'): ('peewee_url', str.strip),
    ('database', 'connect_attempts'): ('database_connect_attempts', _positive_int),
    ('database', 'connect_wait'): ('database_connect_wait', _non_negative(float)),
    ('database', 'debug_logging'): ('database_debug_logging', parse_bool),
    ('notifications', 'url'): ('notifications_url', _optional_url),
    ('notifications', 'callback_prefixes'): ('notifications_callback_prefixes', _url_list),
    ('notifications', 'format'): ('notifications_format', lambda text: _one_of(text, EVENT_FORMATS)),
    ('notifications', 'source'): ('notifications_source', _uri_reference),
    ('notifications', 'timeout'): ('notifications_timeout', _non_negative(float, strictly=True)),
    ('notifications', 'interval'): ('notifications_interval', _non_negative(float, strictly=True)),
    ('notifications', 'retry_wait'): ('notifications_retry_wait', _non_negative(float, strictly=True)),
    ('notifications', 'retry_wait_max'): ('notifications_retry_wait_max', _non_negative(float, strictly=True)),
    ('notifications', 'give_up_after'): ('notifications_give_up_after', _non_negative(float)),
    ('metrics', 'enabled'): ('metrics_enabled', parse_bool),
    ('metrics', 'multiprocess_dir'): ('metrics_multiprocess_dir', _optional_absolute_path),
    ('metrics', 'worker_port'): ('metrics_worker_port', _port),
    ('metrics', 'worker_address'): ('metrics_worker_address', str.strip),
}


def load_settings(config_file: Optional[str] = None, environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Read the INI file (if it exists) over the environment over the defaults.

    A missing file is not an error (the published service behaves the same way);
    a value that does not parse raises ConfigError naming the section and key.
    """
    env = os.environ if environ is None else environ
    path = default_config_path(env) if config_file is None else config_file
    parser = configparser.ConfigParser(interpolation=None)
    for option in OPTIONS:
        if not parser.has_section(option.section):
            parser.add_section(option.section)
        parser.set(option.section, option.key, env.get(option.env, option.default))
    read_from: Optional[str] = None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding='utf-8') as handle:
                parser.read_file(handle, source=path)
        except (OSError, configparser.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f'cannot read config file {path}: {exc}') from exc
        read_from = path
    values: Dict[str, object] = {'config_file': read_from}
    for (section, key), (field, parse) in _FIELDS.items():
        text = parser.get(section, key)
        try:
            values[field] = parse(text)
        except ValueError as exc:
            env_name = next(opt.env for opt in OPTIONS if (opt.section, opt.key) == (section, key))
            raise ConfigError(f'bad value for [{section}] {key} (env {env_name}): {exc}') from exc
    return Settings(**values)  # type: ignore[arg-type]


def check_volume(settings: Settings) -> None:
    """Fail with a ConfigError unless volume_path is (or can be made) a writable directory."""
    path = settings.volume_path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f'bad value for [cartd] volume_path (env VOLUME_PATH): '
                          f'cannot create {path}: {exc.strerror}') from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f'bad value for [cartd] volume_path (env VOLUME_PATH): {path} is not writable')
    if path.resolve() in SHARED_TEMPORARY_DIRECTORIES:
        LOGGER.warning('[cartd] volume_path is %s, a shared temporary directory: carts there can be swept by '
                       'tmp cleaners, lost at a reboot (tmpfs) and, under systemd PrivateTmp, the server and '
                       'the workers each see their own; set volume_path to a directory of its own '
                       '(docs/deployment.md)', path)
