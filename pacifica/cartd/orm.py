"""Peewee models of carts, their files, tasks and space reservations (bound to a proxy, so nothing connects at
import), and the named queries and compare-and-set helpers the use cases work through."""
from __future__ import annotations

import csv
import datetime
import enum
import functools
import hashlib
import io
import math
import operator
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, cast

from peewee import (
    IntegrityError,
    SQL,
    AutoField,
    BigIntegerField,
    BooleanField,
    Case,
    CharField,
    ColumnBase,
    CompositeKey,
    DatabaseProxy,
    DateTimeField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    PostgresqlDatabase,
    TextField,
    chunked,
    fn,
)

DB = DatabaseProxy()


def _each(key: Any, pairs: Sequence[Tuple[Any, Any]]) -> Any:
    """The per-row value of an UPDATE whose WHERE takes exactly the pairs' rows: the one value when they all
    have the same (no CASE at all), else a ById."""
    values = {value for _, value in pairs}
    if len(values) == 1:
        return next(iter(values))
    return ById(key, pairs)


class ById(ColumnBase):
    """`CASE <key> WHEN k THEN v ... [ELSE default] END` for a batch update's per-row values, written in one
    pass: peewee's Case makes four nodes of each pair, and building them was most of the cost of recording
    a batch of files staged. Keys and values are passed as they are (no field conversion): ids, sizes,
    times as floats and text, as the callers have them."""

    def __init__(self, key: Any, pairs: Sequence[Tuple[Any, Any]], default: Any = None) -> None:
        """The value of each row whose `key` is a pair's first item is the pair's second; else `default`."""
        super().__init__()
        self.key = key
        self.pairs = pairs
        self.default = default

    def __sql__(self, ctx: Any) -> Any:
        """Render it into the query under construction."""
        ctx.literal('CASE ')
        ctx.sql(self.key)
        for key, value in self.pairs:
            ctx.literal(' WHEN ')
            ctx.value(key, converter=False)
            ctx.literal(' THEN ')
            ctx.value(value, converter=False)
        if self.default is not None:
            ctx.literal(' ELSE ')
            ctx.value(self.default, converter=False)
        return ctx.literal(' END')


class CartStatus(str, enum.Enum):
    """A cart's state as stored; the wire shows only staging, ready and error."""

    WAITING = 'waiting'
    STAGING = 'staging'
    BUNDLING = 'bundling'
    READY = 'ready'
    ERROR = 'error'
    DELETED = 'deleted'
    EXPIRED = 'expired'  # schema 2.5: a ready cart past its lifetime whose files the workers removed

    @property
    def wire(self) -> str:
        """The X-Pacifica-Status value: clients only ever see staging until ready or error."""
        if self in (CartStatus.WAITING, CartStatus.BUNDLING):
            return CartStatus.STAGING.value
        if self == CartStatus.EXPIRED:
            return CartStatus.ERROR.value
        return self.value


class FileStatus(str, enum.Enum):
    """A file's state: waiting to be pulled, staged (on disk and verified), or failed."""

    WAITING = 'waiting'
    STAGING = 'staging'
    RECALLING = 'recalling'  # schema 2.3: on tape, a recall asked for
    TRANSFERRING = 'transferring'  # schema 2.4: its download has started
    STAGED = 'staged'
    ERROR = 'error'


def now() -> datetime.datetime:
    """Timestamps are naive local time, as the published schema stores them."""
    return datetime.datetime.now()


class BaseModel(Model):
    """Every table lives in the proxied database."""

    class Meta:
        """Bind to the proxy."""

        database = DB


class CartSystem(BaseModel):
    """Key/value rows holding the schema version ('major', 'minor')."""

    part = CharField(primary_key=True)
    value = IntegerField(default=-1)

    class Meta:
        """Table name of the published schema."""

        table_name = 'cartsystem'


class Cart(BaseModel):
    """One cart a client asked for; files_total/files_staged decide completion in O(1)."""

    id = AutoField()
    cart_uid = CharField(default='1', index=True)
    bundle_path = CharField(default='')
    bundle = BooleanField(default=False, null=True)
    creation_date = DateTimeField(default=now)
    updated_date = DateTimeField(default=now)
    deleted_date = DateTimeField(null=True)
    status = TextField(default=CartStatus.WAITING.value)
    error = TextField(default='')
    # Added in schema 2.1. Server-side defaults keep a 2.0 writer able to insert.
    files_total = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    files_staged = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    # Added in schema 2.2: bytes of the bundle tar laid out so far (0: not written in place).
    bundle_size = BigIntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    # Added in schema 2.3: progress, kept on the row so HEAD stays one indexed query.
    files_failed = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    files_on_tape = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    files_sized = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])  # files whose size is known
    bytes_total = BigIntegerField(default=0, constraints=[SQL('DEFAULT 0')])  # the sum of the known sizes
    bytes_staged = BigIntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    ready_date = DateTimeField(null=True)
    # Added in schema 2.4: files whose download has started (now, not ever: it goes down as they
    # end), and the highest share of the cart's bytes shown staged (it never goes down).
    files_transferring = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    percent_staged = DoubleField(default=0, constraints=[SQL('DEFAULT 0')])
    # Added in schema 2.5: seconds the cart is kept once ready (0: for ever), and when it expires.
    lifetime = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    expires_date = DateTimeField(null=True)
    # Added in schema 2.6: 'skip' when a file that cannot be staged is left out of the tar
    # (listed in its MISSING_FILES.txt) instead of failing the cart.
    on_file_error = CharField(max_length=8, default='fail', constraints=[SQL("DEFAULT 'fail'")])
    # Added in schema 2.8: where the cart's completion events also go (its POST's callback_url).
    callback_url = TextField(null=True)

    class Meta:
        """Table name of the published schema."""

        table_name = 'cart'


class CartTasks(BaseModel):
    """Celery task ids queued for a cart, so a DELETE can revoke them."""

    cart = ForeignKeyField(Cart, column_name='cart_id', index=True)
    celery_task_id = CharField(default='')

    class Meta:
        """Table name of the published schema."""

        table_name = 'carttasks'


class File(BaseModel):
    """One file of a cart: its archive id, its path inside the cart and its expected hash."""

    id = AutoField()
    cart = ForeignKeyField(Cart, field='id', backref='files', column_name='cart_id')
    file_name = CharField(default='')
    bundle_path = CharField(default='')
    hash_type = CharField(null=True)
    hash_value = CharField(null=True)
    status = TextField(default=FileStatus.WAITING.value)
    error = TextField(default='')
    # Added in schema 2.1: what the archive reported, used to lay out the tar.
    size = BigIntegerField(null=True)
    mtime = DoubleField(null=True)
    # Added in schema 2.2: where the file's bytes start in its cart's bundle tar.
    tar_offset = BigIntegerField(null=True)
    # Added in schema 2.4: downloads of the file started so far (a retry and a re-fetch each count).
    attempts = IntegerField(default=0, constraints=[SQL('DEFAULT 0')])
    # Added in schema 2.9: when the file was first found on tape (a recall asked for), until it is staged.
    recall_date = DateTimeField(null=True)
    # Added in schema 2.10: the staged-file cache entry the file was served from (share_staged_files): its
    # pin, held while the cart lives. No foreign key, so the entry's row can go without touching the cart's.
    staged_file_id = IntegerField(null=True, index=True)

    class Meta:
        """Table name of the published schema."""

        table_name = 'file'


class SpaceReservation(BaseModel):
    """Disk bytes a download in flight may still write (schema 2.1); one row per file being pulled."""

    file = ForeignKeyField(File, column_name='file_id', primary_key=True)
    cart = ForeignKeyField(Cart, column_name='cart_id', index=True)
    bytes = BigIntegerField()
    partial = TextField(null=True)  # the temp file being written, so bytes already on disk are not counted twice
    tar_offset = BigIntegerField(null=True)  # schema 2.2: written in place from here on into `partial`, the tar
    created = DateTimeField(default=now)

    class Meta:
        """Not a 0.7.0 table."""

        table_name = 'spacereservation'


class WorkerSighting(BaseModel):
    """A worker's last "still here" (schema 2.7): one row per worker name, so a server can tell that
    no worker is there to stage its carts."""

    name = CharField(max_length=255, unique=True)  # the worker's node name, e.g. celery@host
    pid = IntegerField()
    started_date = DateTimeField(default=now)
    seen_date = DateTimeField(default=now, index=True)

    class Meta:
        """Not a 0.7.0 table."""

        table_name = 'workersighting'


class EventState(str, enum.Enum):
    """Where an outbox row stands: still to send, sent (a 2xx came back), or given up."""

    PENDING = 'pending'
    DELIVERED = 'delivered'
    ABANDONED = 'abandoned'


class CartEvent(BaseModel):
    """The outbox (schema 2.8): one completion event of a cart for one target URL, written in the
    transaction that finished the cart and sent by the workers until a 2xx comes back.

    The cart is named by id and uid, not a foreign key: a purged cart's events are still sent.
    """

    id = AutoField()
    event_id = CharField(max_length=36)  # the stable id (a UUID) every attempt sends
    cart_id = IntegerField()
    event_type = CharField(max_length=64)
    subject = CharField()  # the cart's uid
    event_time = CharField(max_length=40)  # RFC 3339, when the cart finished
    data = TextField()  # the status document without files, as JSON
    target_url = TextField()
    state = CharField(max_length=16, default=EventState.PENDING.value)
    next_attempt = DateTimeField(default=now)  # also the lease: a sender claims the row by moving it on
    attempts = IntegerField(default=0)
    last_error = TextField(default='')
    created = DateTimeField(default=now)
    delivered_date = DateTimeField(null=True)

    class Meta:
        """Not a 0.7.0 table; the senders look for pending rows that are due."""

        table_name = 'cartevent'
        indexes = ((('state', 'next_attempt'), False),)


class CartCounter(BaseModel):
    """Fleet-wide counters (schema 2.9): what every process did, kept across restarts, one row per name and label.

    Bumped with `value = value + n` in the transaction that makes the change, so a rolled-back
    change counts nothing and every process and host adds to the same rows.
    """

    name = CharField(max_length=64)
    label = CharField(max_length=32, default='', constraints=[SQL("DEFAULT ''")])
    value = BigIntegerField(default=0, constraints=[SQL('DEFAULT 0')])

    class Meta:
        """Not a 0.7.0 table."""

        table_name = 'cartcounter'
        primary_key = CompositeKey('name', 'label')


class StagedFileState(str, enum.Enum):
    """Where a staged-file cache entry stands: its first download under way, ready to link, or not to be used."""

    FETCHING = 'fetching'
    READY = 'ready'
    UNTRUSTED = 'untrusted'


class StagedFile(BaseModel):
    """One archive file staged once on the volume (schema 2.10, share_staged_files), linked into every cart
    that asks for it.

    Keyed by the archive's id, size and mtime (cache_key, a sha256 of them), so a file changed in
    the archive is another entry. `digests` holds every digest computed of its bytes, as JSON.
    A 'fetching' entry belongs to the download holding its lease; an 'untrusted' one no longer
    answers to its key (it was retired) and is never linked again.
    """

    id = AutoField()
    cache_key = CharField(max_length=64, unique=True)
    archive_id = TextField()
    # Added in schema 2.11: sha256 of archive_id, indexed, so a cart's files are looked up in the cache by the
    # archive's ids alone, many at once (MySQL cannot index archive_id, a TEXT, without a prefix length).
    archive_key = CharField(max_length=64, index=True, null=True)
    size = BigIntegerField(null=True)
    mtime = DoubleField(null=True)
    state = CharField(max_length=16, default=StagedFileState.FETCHING.value)
    digests = TextField(default='{}')
    lease_until = DateTimeField(null=True)
    lease_owner = CharField(max_length=32, null=True)  # the claiming download's token, compared to move the entry
    hits = IntegerField(default=0)  # carts served from it without a download
    last_used = DateTimeField(default=now, index=True)  # indexed in schema 2.11: eviction takes the oldest first
    created = DateTimeField(default=now)

    class Meta:
        """Not a 0.7.0 table."""

        table_name = 'stagedfile'


MODELS = (CartSystem, Cart, File, CartTasks, SpaceReservation, WorkerSighting, CartEvent, CartCounter,
          StagedFile)

FILES_STAGED, STAGED_BYTES, HASH_MISMATCHES, EVICTIONS, CARTS_FINISHED = (
    'files_staged', 'staged_bytes', 'hash_mismatches', 'evictions', 'carts_finished')
# Files linked from the staged-file cache (share_staged_files): made at the first hit (bump_counters makes a
# missing row), not with the table, so a database that never shares files has no such row.
CACHE_HITS = 'staged_file_cache_hits'
# Every counter row, made with the table: a bump is then always an UPDATE of an existing row.
COUNTER_ROWS: Tuple[Tuple[str, str], ...] = (
    (FILES_STAGED, ''), (STAGED_BYTES, ''), (HASH_MISMATCHES, ''), (EVICTIONS, ''),
    (CARTS_FINISHED, 'ready'), (CARTS_FINISHED, 'error'), (CARTS_FINISHED, 'expired'))


LIVE_STATUSES = (CartStatus.WAITING.value, CartStatus.STAGING.value)
ACTIVE_STATUSES = LIVE_STATUSES + (CartStatus.BUNDLING.value,)
INSERT_CHUNK = 200  # rows per INSERT or bulk UPDATE statement
FILE_INSERT_ROWS = 500  # rows per INSERT of a new cart's files (7 parameters each; SQLite takes 32,766)
STALE_AT_ONCE = datetime.datetime(2000, 1, 1)  # an updated_date the next reconcile treats as stalled
SKIP = 'skip'  # Cart.on_file_error of a cart that leaves out the files it cannot stage
MAX_PERCENT_STAGING = 99.9  # the percent a cart not ready yet shows at most

# A requested file as the rows take it: (archive id, path in the cart, hash type, hash value).
FileRow = Tuple[str, str, str, str]
# A staged file as recorded: (file id, size, mtime, downloads of it started so far).
StagedRow = Tuple[int, int, Optional[float], int]


class Progress(NamedTuple):
    """A cart's counters as HEAD reports them; files_staged, files_failed and bytes_staged never go down."""

    files_total: int = 0
    files_staged: int = 0
    files_failed: int = 0
    files_on_tape: int = 0
    files_sized: int = 0
    bytes_total: int = 0
    bytes_staged: int = 0
    files_transferring: int = 0  # now, not ever: it goes down as downloads end

    @property
    def bytes_known(self) -> bool:
        """Whether every file's size is known, so bytes_total is the cart's size."""
        return self.files_sized >= self.files_total

    def percent_estimate(self) -> float:
        """Percent of the cart's bytes staged, to a tenth, below 100 (only a ready cart is at 100).

        While some sizes are unknown, each such file counts as the mean of the known ones; with
        none known (or a cart of empty files), files count instead of bytes. It can go down as
        sizes become known: the cart keeps the highest value shown (percent_staged).
        """
        if self.files_total <= 0:
            return 0.0
        if self.files_sized > 0 and self.bytes_total > 0:
            whole = self.bytes_total * self.files_total / min(self.files_sized, self.files_total)
            share = self.bytes_staged / whole
        else:
            share = self.files_staged / self.files_total
        return min(math.floor(share * 1000) / 10, MAX_PERCENT_STAGING)


PROGRESS_FIELDS = (Cart.files_total, Cart.files_staged, Cart.files_failed, Cart.files_on_tape, Cart.files_sized,
                   Cart.bytes_total, Cart.bytes_staged, Cart.files_transferring)


class StoredState(NamedTuple):
    """What HEAD reads of the newest live cart of a uid."""

    status: str
    error: str
    progress: Progress
    expires: Optional[datetime.datetime] = None


class StagedCount(NamedTuple):
    """What a cart's counters gain when files are recorded staged."""

    files: int = 0
    from_tape: int = 0  # of them, files that were recalling
    from_transfer: int = 0  # of them, files recorded transferring
    newly_sized: int = 0  # of them, files whose size was not known before
    size_change: int = 0  # added to bytes_total (a size learnt, or changed since it was learnt)
    bytes: int = 0  # added to bytes_staged
    recalls: Tuple[float, ...] = ()  # of them, the seconds from each recalled file's first sight on tape to now


# ---- carts ---------------------------------------------------------------------------

def insert_cart(cart_uid: str, bundle: bool, files: Sequence[FileRow], bundle_size: int,
                lifetime: int = 0, skip_failed_files: bool = False,
                callback_url: Optional[str] = None) -> Tuple[int, List[int]]:
    """Insert a staging cart (kept `lifetime` seconds once ready, 0: for ever; leaving out files that
    cannot be staged with `skip_failed_files`; its events also sent to `callback_url`) and its waiting
    files; return the cart's id and its files' ids in order."""
    cart = Cart.create(cart_uid=cart_uid, status=CartStatus.STAGING.value, bundle=bundle,
                       files_total=len(files), bundle_size=bundle_size, lifetime=lifetime,
                       on_file_error=SKIP if skip_failed_files else 'fail', callback_url=callback_url)
    _insert_files(cart.id, files)
    return cart.id, _file_ids_of(cart.id)


def _file_ids_of(cart_id: int) -> List[int]:
    """The ids of a cart's files, in order, read straight off the cursor (no model per row)."""
    opening, closing = DB.obj.quote[0], DB.obj.quote[1]
    cursor = DB.execute_sql(f'SELECT {opening}id{closing} FROM {opening}{File._meta.table_name}{closing} '
                            f'WHERE {opening}{File.cart.column_name}{closing} = {DB.obj.param} '
                            f'ORDER BY {opening}id{closing}', (cart_id,))
    return [row[0] for row in cursor.fetchall()]


def _insert_files(cart_id: int, files: Sequence[FileRow]) -> None:
    """INSERT a new cart's file rows, FILE_INSERT_ROWS at a time, as plain parameters.

    Written out rather than through Model.insert_many, whose per-value query building cost
    seconds for a 100,000-file cart; the columns and their quoting come from the model.
    """
    opening, closing = DB.obj.quote[0], DB.obj.quote[1]
    columns = (File.cart, File.file_name, File.bundle_path, File.hash_type, File.hash_value, File.status, File.error)
    names = ', '.join(f'{opening}{column.column_name}{closing}' for column in columns)
    table = f'{opening}{File._meta.table_name}{closing}'
    waiting = FileStatus.WAITING.value
    if isinstance(DB.obj, PostgresqlDatabase):
        # COPY: a third of the time of multi-row INSERTs for 100,000 rows (1.45 s there, with its indexes)
        rows = io.StringIO()
        csv.writer(rows, quoting=csv.QUOTE_ALL).writerows(
            (cart_id, archive_id, path, hash_type, hash_value, waiting, '')
            for archive_id, path, hash_type, hash_value in files)
        rows.seek(0)
        DB.cursor().copy_expert(f'COPY {table} ({names}) FROM STDIN WITH (FORMAT csv)', rows)
        return
    row = '(' + ', '.join([DB.obj.param] * len(columns)) + ')'
    statement = f'INSERT INTO {table} ({names}) VALUES '
    for start in range(0, len(files), FILE_INSERT_ROWS):
        batch = files[start:start + FILE_INSERT_ROWS]
        values = [value for archive_id, path, hash_type, hash_value in batch
                  for value in (cart_id, archive_id, path, hash_type, hash_value, waiting, '')]
        DB.execute_sql(statement + ', '.join([row] * len(batch)), values)


def get_cart(cart_id: int) -> Optional[Cart]:
    """The cart row, or None when it was purged."""
    return Cart.get_or_none(Cart.id == cart_id)


def cart_status(cart_id: int) -> Optional[str]:
    """The cart's stored status, or None when its row is gone."""
    status = Cart.select(Cart.status).where(Cart.id == cart_id).scalar()
    return None if status is None else str(status)


def live_carts(cart_uid: str, *fields: Any) -> List[Cart]:
    """Carts with exactly this uid that are not deleted, newest first.

    The indexed lookup may also match other spellings (MySQL's default collation
    ignores case and trailing spaces), so the exact match is checked here too.
    """
    candidates = (Cart.select(*fields, Cart.cart_uid)
                  .where((Cart.cart_uid == cart_uid) & (Cart.status != CartStatus.DELETED.value))
                  .order_by(Cart.creation_date.desc(), Cart.id.desc()))
    return [cart for cart in candidates if cart.cart_uid == cart_uid]


def newest_live_cart(cart_uid: str) -> Optional[Cart]:
    """The newest cart with this uid that is not deleted (one indexed query), or None."""
    carts = live_carts(cart_uid, *Cart._meta.sorted_fields)
    return carts[0] if carts else None


def newest_live_state(cart_uid: str) -> Optional[StoredState]:
    """Status, error and counters of the newest cart with exactly this uid that is not deleted, or None.

    What every HEAD asks: one indexed query, its SQL made once per database, read straight
    off the cursor (a third of a HEAD's time went into building the query and its models).
    """
    dialect = (DB.obj.quote, DB.obj.param)
    statement = _STATE_QUERIES.get(dialect)
    if statement is None:
        def name(field: Any) -> str:
            return f'{DB.obj.quote[0]}{field.column_name}{DB.obj.quote[1]}'
        counters = ''.join(f', {name(field)}' for field in PROGRESS_FIELDS)
        statement = (f'SELECT {name(Cart.cart_uid)}, {name(Cart.status)}, {name(Cart.error)}, '
                     f'{name(Cart.expires_date)}{counters} '
                     f'FROM {DB.obj.quote[0]}{Cart._meta.table_name}{DB.obj.quote[1]} '
                     f'WHERE {name(Cart.cart_uid)} = {DB.obj.param} AND {name(Cart.status)} <> {DB.obj.param} '
                     f'ORDER BY {name(Cart.creation_date)} DESC, {name(Cart.id)} DESC')
        _STATE_QUERIES[dialect] = statement
    rows = DB.execute_sql(statement, (cart_uid, CartStatus.DELETED.value)).fetchall()
    for uid, status, error, expires, *counters in rows:
        if uid == cart_uid:  # MySQL's collation also matches other spellings (case, trailing spaces)
            return StoredState(str(status), str(error or ''), Progress(*(int(value or 0) for value in counters)),
                               _as_datetime(expires))
    return None


def _as_datetime(value: Any) -> Optional[datetime.datetime]:
    """A DATETIME read straight off a cursor: SQLite gives its text."""
    if value is None or isinstance(value, datetime.datetime):
        return value
    return datetime.datetime.fromisoformat(str(value))


_STATE_QUERIES: Dict[Tuple[str, str], str] = {}  # by quoting and parameter style


def progress_of(cart: Cart) -> Progress:
    """The progress counters of a cart row read whole."""
    return Progress(*(int(getattr(cart, field.name) or 0) for field in PROGRESS_FIELDS))


def touch_cart(cart_id: int) -> None:
    """Mark the cart used (or making progress) now."""
    Cart.update(updated_date=now()).where(Cart.id == cart_id).execute()


def mark_waiting_for_queue(cart_id: int, message: str) -> None:
    """Say why a live cart's work is not queued, and date it so the next reconcile re-drives it."""
    (Cart.update(error=message[:2000], updated_date=STALE_AT_ONCE)
     .where((Cart.id == cart_id) & (Cart.status.in_(LIVE_STATUSES))).execute())


def mark_deleted(cart_ids: Sequence[int]) -> None:
    """Mark these carts deleted now."""
    Cart.update(status=CartStatus.DELETED.value, deleted_date=now(), updated_date=now()).where(
        Cart.id.in_(list(cart_ids))).execute()


def _staged_counters(count: StagedCount) -> Dict[Any, Any]:
    return {Cart.files_staged: Cart.files_staged + count.files,
            Cart.files_on_tape: Cart.files_on_tape - count.from_tape,
            Cart.files_transferring: Cart.files_transferring - count.from_transfer,
            Cart.files_sized: Cart.files_sized + count.newly_sized,
            Cart.bytes_total: Cart.bytes_total + count.size_change,
            Cart.bytes_staged: Cart.bytes_staged + count.bytes}


def count_staged(cart_id: int, count: StagedCount) -> bool:
    """Add newly staged files to a live cart's counters and raise its percent to match;
    False when the cart is no longer staging."""
    live = bool(Cart.update({**_staged_counters(count), Cart.updated_date: now()})
                .where((Cart.id == cart_id) & (Cart.status.in_(LIVE_STATUSES))).execute())
    if live:
        row = Cart.select(*PROGRESS_FIELDS, Cart.percent_staged).where(Cart.id == cart_id).tuples().first()
        if row is not None:
            *counters, shown = row
            percent = Progress(*(int(value or 0) for value in counters)).percent_estimate()
            if percent > float(shown or 0):
                (Cart.update(percent_staged=percent)
                 .where((Cart.id == cart_id) & (Cart.percent_staged < percent)).execute())
    return live


def count_staged_of_failed(cart_id: int, count: StagedCount) -> bool:
    """Add files verified on the volume to a failed cart's counters (eviction frees them first); False unless failed."""
    return bool(Cart.update(_staged_counters(count))
                .where((Cart.id == cart_id) & (Cart.status == CartStatus.ERROR.value)).execute())


def claim_for_bundling(cart_id: int) -> bool:
    """Move a live cart whose files are all staged (or, for a cart that skips failed files, staged or
    failed) to bundling; True for the one caller that did it."""
    done = Cart.files_staged + Case(None, [(Cart.on_file_error == SKIP, Cart.files_failed)], 0)
    return bool(Cart.update(status=CartStatus.BUNDLING.value, updated_date=now())
                .where((Cart.id == cart_id) & (Cart.status.in_(LIVE_STATUSES)) & (done >= Cart.files_total))
                .execute())


def mark_ready(cart_id: int, bundle_path: str, message: str = '') -> bool:
    """Move a bundling cart to ready, served from `bundle_path`, its lifetime counted from now, with
    `message` (a cart that skipped files lists them); False when it is no longer bundling."""
    moment = now()
    lifetime = int(Cart.select(Cart.lifetime).where(Cart.id == cart_id).scalar() or 0)
    expires = moment + datetime.timedelta(seconds=lifetime) if lifetime > 0 else None
    with DB.atomic():
        ready = bool(Cart.update(status=CartStatus.READY.value, bundle_path=bundle_path, updated_date=moment,
                                 ready_date=moment, expires_date=expires, error=message[:2000])
                     .where((Cart.id == cart_id) & (Cart.status == CartStatus.BUNDLING.value)).execute())
        if ready:
            bump_counters({(CARTS_FINISHED, CartStatus.READY.value): 1})
    return ready


def fail_cart(cart_id: int, message: str) -> bool:
    """Move a cart that is still being worked on to error, with the message clients will see (and count it
    finished in error); True for the one caller that did it."""
    with DB.atomic():
        failed = bool(Cart.update(status=CartStatus.ERROR.value, error=message, updated_date=now())
                      .where((Cart.id == cart_id) & (Cart.status.in_(ACTIVE_STATUSES)))
                      .execute())
        if failed:
            bump_counters({(CARTS_FINISHED, CartStatus.ERROR.value): 1})
    return failed


def grow_bundle(cart_id: int, region: int) -> Optional[int]:
    """Lay out `region` more bytes at the end of a cart's bundle tar; return the new end.

    None when the cart's tar is not laid out in place (bundle_size 0: an older version's cart).
    """
    grown = (Cart.update(bundle_size=Cart.bundle_size + region)
             .where((Cart.id == cart_id) & (Cart.bundle_size > 0)).execute())
    if not grown:
        return None
    return int(Cart.select(Cart.bundle_size).where(Cart.id == cart_id).scalar())


def counters_from_rows() -> Dict[Any, Any]:
    """The progress counters of a cart as its file rows say (correlated subqueries on Cart.id)."""
    def files(*where: Any) -> Any:
        return File.select(fn.COUNT(File.id)).where(File.cart == Cart.id, *where)

    def size_sum(*where: Any) -> Any:
        return File.select(fn.COALESCE(fn.SUM(File.size), 0)).where(File.cart == Cart.id, *where)

    staged = File.status == FileStatus.STAGED.value
    return {Cart.files_total: files(), Cart.files_staged: files(staged),
            Cart.files_failed: files(File.status == FileStatus.ERROR.value),
            Cart.files_on_tape: files(File.status == FileStatus.RECALLING.value),
            Cart.files_transferring: files(File.status == FileStatus.TRANSFERRING.value),
            Cart.files_sized: files(File.size.is_null(False)),
            Cart.bytes_total: size_sum(), Cart.bytes_staged: size_sum(staged)}


def restart_cart(cart_id: int) -> None:
    """Put a cart back to staging with its counters set from its file rows (an operator's repair:
    the one place counters may go down); its lifetime starts again when it is ready again."""
    Cart.update({**counters_from_rows(), Cart.status: CartStatus.STAGING.value, Cart.error: '',
                 Cart.updated_date: now(), Cart.deleted_date: None, Cart.ready_date: None,
                 Cart.expires_date: None}).where(Cart.id == cart_id).execute()


def stalled_carts(before: datetime.datetime, limit: int) -> List[Cart]:
    """Carts being worked on with no progress since `before`, longest stalled first."""
    return list(Cart.select(Cart.id, Cart.status, Cart.updated_date, Cart.cart_uid)
                .where(Cart.status.in_(ACTIVE_STATUSES) & (Cart.updated_date < before))
                .order_by(Cart.updated_date).limit(limit))


def claim_stalled(cart: Cart, note: str) -> bool:
    """Claim a stalled cart for re-driving (compare-and-set on the updated_date it was found with)."""
    return bool(Cart.update(updated_date=now(), error=note)
                .where((Cart.id == cart.id) & (Cart.updated_date == cart.updated_date)
                       & Cart.status.in_(ACTIVE_STATUSES)).execute())


def carts_not_deleted() -> List[Cart]:
    """Every cart that is not deleted, oldest first."""
    return list(Cart.select().where(Cart.status != CartStatus.DELETED.value).order_by(Cart.id))


def carts_unused_since(moment: datetime.datetime) -> List[Cart]:
    """(id, uid) of the carts, in any state, not used since `moment`."""
    return list(Cart.select(Cart.id, Cart.cart_uid).where(Cart.updated_date < moment).order_by(Cart.id))


def delete_cart_rows(cart_id: int) -> None:
    """Remove a cart's rows: reservations, tasks, files and the cart itself."""
    SpaceReservation.delete().where(SpaceReservation.cart == cart_id).execute()
    CartTasks.delete().where(CartTasks.cart == cart_id).execute()
    File.delete().where(File.cart == cart_id).execute()
    Cart.delete().where(Cart.id == cart_id).execute()


def oldest_evictable(used_before: datetime.datetime, skipping: Sequence[int] = ()) -> Optional[Cart]:
    """The cart whose files go first, if it was last used before `used_before` (one ordered query; not one
    of `skipping`).

    First the ready carts past their lifetime (the workers' sweep would remove them anyway),
    then the failed carts that still have staged files on the volume (deleted_date not set),
    the longest failed first (they can never be downloaded), then the ready carts, least
    recently used first.
    """
    moment = now()
    first = Case(None, [((Cart.status == CartStatus.READY.value) & (Cart.expires_date <= moment), 0),
                        (Cart.status == CartStatus.ERROR.value, 1)], 2)
    where = (((Cart.status == CartStatus.READY.value)
              | ((Cart.status == CartStatus.ERROR.value) & (Cart.files_staged > 0) & Cart.deleted_date.is_null()))
             & (Cart.updated_date < used_before))
    if skipping:
        where &= Cart.id.not_in(list(skipping))
    return (Cart.select(Cart.id, Cart.cart_uid, Cart.status, Cart.updated_date, Cart.expires_date)
            .where(where).order_by(first, Cart.updated_date, Cart.id).first())


def expired_unused(moment: datetime.datetime, used_before: datetime.datetime, limit: int) -> List[Cart]:
    """Ready carts past their lifetime at `moment` and not used since `used_before`, the longest expired first."""
    return list(Cart.select(Cart.id, Cart.cart_uid, Cart.status, Cart.updated_date, Cart.expires_date)
                .where((Cart.status == CartStatus.READY.value) & (Cart.expires_date <= moment)
                       & (Cart.updated_date < used_before))
                .order_by(Cart.expires_date, Cart.id).limit(limit))


def claim_expiry(cart: Cart) -> bool:
    """Mark a cart found by expired_unused expired (its files to remove), unless it was used or changed since."""
    with DB.atomic():
        expired = bool(Cart.update(status=CartStatus.EXPIRED.value, deleted_date=now())
                       .where((Cart.id == cart.id) & (Cart.status == CartStatus.READY.value)
                              & (Cart.updated_date == cart.updated_date)).execute())
        if expired:
            bump_counters({(CARTS_FINISHED, CartStatus.EXPIRED.value): 1})
    return expired


def newest_deleted_cart(cart_uid: str) -> Optional[Cart]:
    """The cart with exactly this uid deleted last (a tombstone for the status document), or None."""
    candidates = (Cart.select().where((Cart.cart_uid == cart_uid) & (Cart.status == CartStatus.DELETED.value))
                  .order_by(Cart.deleted_date.desc(), Cart.id.desc()).limit(20))
    return next((cart for cart in candidates if cart.cart_uid == cart_uid), None)


def claim_eviction(cart: Cart) -> bool:
    """Claim a cart found by oldest_evictable, unless it was used or changed since it was found.

    A ready cart is marked deleted by eviction. A failed cart keeps its row, status, error and
    counters (HEAD answers as before; counters never go down); deleted_date records that its
    files left the volume (so it is not found again), its files go back to waiting and its
    reservations are dropped. Counted in the caller's transaction (the reservation's, serialised).
    """
    if cart.status == CartStatus.ERROR.value:
        claimed = bool(Cart.update(deleted_date=now())
                       .where((Cart.id == cart.id) & (Cart.status == CartStatus.ERROR.value)
                              & (Cart.updated_date == cart.updated_date) & Cart.deleted_date.is_null()).execute())
        if claimed:
            (File.update(status=FileStatus.WAITING.value)
             .where((File.cart == cart.id) & (File.status == FileStatus.STAGED.value)).execute())
            drop_cart_reservations(cart.id)
    else:
        claimed = bool(Cart.update(status=CartStatus.DELETED.value, deleted_date=now(),
                                   error='evicted to make room on the volume')
                       .where((Cart.id == cart.id) & (Cart.status == CartStatus.READY.value)
                              & (Cart.updated_date == cart.updated_date)).execute())
    if claimed:
        bump_counters({(EVICTIONS, ''): 1})
    return claimed


# ---- the event outbox -------------------------------------------------------------------

class EventRow(NamedTuple):
    """One event to write to the outbox, once per target URL."""

    event_id: str
    cart_id: int
    event_type: str
    subject: str
    event_time: str
    data: str


def insert_events(event: EventRow, target_urls: Sequence[str]) -> None:
    """Write an event to the outbox for each target, due now (inside the transaction that finished the cart)."""
    CartEvent.insert_many([{**event._asdict(), 'target_url': url, 'state': EventState.PENDING.value,
                            'next_attempt': now(), 'attempts': 0, 'last_error': ''}
                           for url in target_urls]).execute()


def due_events(moment: datetime.datetime, limit: int) -> List[CartEvent]:
    """Pending events due at `moment` (their wait or a sender's lease is over), the longest due first."""
    return list(CartEvent.select().where((CartEvent.state == EventState.PENDING.value)
                                         & (CartEvent.next_attempt <= moment))
                .order_by(CartEvent.next_attempt, CartEvent.id).limit(limit))


def claim_event(event: CartEvent, lease_until: datetime.datetime) -> bool:
    """Take a due event for one send until `lease_until` (compare-and-set on the next_attempt it was found
    with); counts the attempt. False when another sender took it or it was sent meanwhile."""
    return bool(CartEvent.update(next_attempt=lease_until, attempts=CartEvent.attempts + 1)
                .where((CartEvent.id == event.id) & (CartEvent.state == EventState.PENDING.value)
                       & (CartEvent.next_attempt == event.next_attempt)).execute())


def event_delivered(event_id: int) -> None:
    """Record that a target answered 2xx to the event."""
    CartEvent.update(state=EventState.DELIVERED.value, delivered_date=now(), last_error='').where(
        CartEvent.id == event_id).execute()


def event_failed(event_id: int, error: str, next_attempt: Optional[datetime.datetime]) -> None:
    """Record a failed send: tried again at `next_attempt`, or given up when that is None."""
    if next_attempt is None:
        CartEvent.update(state=EventState.ABANDONED.value, last_error=error[:2000]).where(
            (CartEvent.id == event_id) & (CartEvent.state == EventState.PENDING.value)).execute()
        return
    CartEvent.update(next_attempt=next_attempt, last_error=error[:2000]).where(
        (CartEvent.id == event_id) & (CartEvent.state == EventState.PENDING.value)).execute()


def drop_finished_events(finished_before: datetime.datetime) -> int:
    """Remove delivered and given-up events whose cart finished before `finished_before`; return how many."""
    return int(CartEvent.delete().where(CartEvent.state.in_((EventState.DELIVERED.value, EventState.ABANDONED.value))
                                        & (CartEvent.created < finished_before)).execute())


# ---- the staged-file cache (schema 2.9) -------------------------------------------------

def archive_key_of(archive_id: str) -> str:
    """The indexed stand-in for an archive id (StagedFile.archive_key)."""
    return hashlib.sha256(archive_id.encode('utf-8')).hexdigest()


def fill_archive_keys() -> int:
    """Set archive_key on the entries without one (schema 2.11's upgrade); return how many."""
    rows = cast(List[Tuple[int, str]], list(StagedFile.select(StagedFile.id, StagedFile.archive_id)
                                            .where(StagedFile.archive_key.is_null()).tuples()))
    for chunk in chunked(rows, INSERT_CHUNK):
        StagedFile.update(archive_key=ById(StagedFile.id, [(entry_id, archive_key_of(str(archive_id)))
                                                           for entry_id, archive_id in chunk])).where(
            StagedFile.id.in_([entry_id for entry_id, _ in chunk])).execute()
    return len(rows)


def ready_entries_of(archive_ids: Iterable[str]) -> List[StagedFile]:
    """The ready cache entries of these archive files (by archive_key: one indexed query per INSERT_CHUNK ids),
    with their id, archive_id, size, mtime and digests only."""
    found: List[StagedFile] = []
    for chunk in chunked(sorted({archive_key_of(archive_id) for archive_id in archive_ids}), INSERT_CHUNK):
        found.extend(StagedFile.select(StagedFile.id, StagedFile.archive_id, StagedFile.size, StagedFile.mtime,
                                       StagedFile.digests)
                     .where(StagedFile.archive_key.in_(chunk) & (StagedFile.state == StagedFileState.READY.value)))
    return found


def staged_files_by_keys(cache_keys: Sequence[str]) -> Dict[str, StagedFile]:
    """The cache entries answering to these keys (fetching or ready), by key: one query per INSERT_CHUNK."""
    found: Dict[str, StagedFile] = {}
    for chunk in chunked(sorted(set(cache_keys)), INSERT_CHUNK):
        found.update((str(entry.cache_key), entry) for entry in StagedFile.select().where(
            StagedFile.cache_key.in_(chunk)))
    return found


class NewEntry(NamedTuple):
    """A key to claim: the archive file's id, size and mtime, and the token of the download that claims it."""

    cache_key: str
    archive_id: str
    size: Optional[int]
    mtime: Optional[float]
    owner: str


def insert_staged_files(entries: Sequence[NewEntry], lease_until: datetime.datetime) -> None:
    """Claim keys nobody holds: 'fetching' entries leased until `lease_until`, one statement per INSERT_CHUNK.
    A key another process inserted first is left as it is (the unique key makes one winner): read the
    entries back to see whose each one is."""
    moment = now()
    for chunk in chunked(entries, INSERT_CHUNK):
        StagedFile.insert_many([{
            StagedFile.cache_key: entry.cache_key, StagedFile.archive_id: entry.archive_id,
            StagedFile.archive_key: archive_key_of(entry.archive_id), StagedFile.size: entry.size,
            StagedFile.mtime: entry.mtime, StagedFile.state: StagedFileState.FETCHING.value,
            StagedFile.digests: '{}', StagedFile.lease_until: lease_until, StagedFile.lease_owner: entry.owner,
            StagedFile.hits: 0, StagedFile.last_used: moment, StagedFile.created: moment,
        } for entry in chunk]).on_conflict_ignore().execute()


def _held_by(entry_id: int, owner: str) -> Any:
    return ((StagedFile.id == entry_id) & (StagedFile.state == StagedFileState.FETCHING.value)
            & (StagedFile.lease_owner == owner))


def take_over_staged_file(entry: StagedFile, owner: str, lease_until: datetime.datetime) -> bool:
    """Take a 'fetching' entry whose lease ran out (compare-and-set on the holder it was read with)."""
    return bool(StagedFile.update(lease_owner=owner, lease_until=lease_until, digests='{}')
                .where(_held_by(entry.id, str(entry.lease_owner))).execute())


def renew_staged_file_lease(entry_id: int, owner: str, new_until: datetime.datetime) -> bool:
    """Move the lease of a 'fetching' entry this download holds on; False when it was taken over."""
    return bool(StagedFile.update(lease_until=new_until).where(_held_by(entry_id, owner)).execute())


class ReadyEntry(NamedTuple):
    """A fetched entry to mark ready: its id, the token of the download holding it, its digests (JSON)."""

    entry_id: int
    owner: str
    digests: str


def staged_files_ready(entries: Sequence[ReadyEntry]) -> int:
    """Mark the entries these downloads hold ready, with their digests (one statement per INSERT_CHUNK);
    return how many were (one taken over meanwhile is left to its new holder)."""
    changed = 0
    for chunk in chunked(entries, INSERT_CHUNK):
        changed += (StagedFile.update(state=StagedFileState.READY.value, lease_until=None, lease_owner=None,
                                      last_used=now(),
                                      digests=ById(StagedFile.id, [(row.entry_id, row.digests) for row in chunk]))
                    .where(StagedFile.id.in_([row.entry_id for row in chunk])
                           & (StagedFile.state == StagedFileState.FETCHING.value)
                           & (StagedFile.lease_owner == ById(StagedFile.id,
                                                             [(row.entry_id, row.owner) for row in chunk])))
                    .execute())
    return int(changed)


def set_staged_file_digests(entry_id: int, before: str, after: str) -> bool:
    """Record a ready entry's digests (compare-and-set on the text read); False when they changed meanwhile."""
    return bool(StagedFile.update(digests=after)
                .where((StagedFile.id == entry_id) & (StagedFile.state == StagedFileState.READY.value)
                       & (StagedFile.digests == before)).execute())


def retire_staged_file(entry_id: int, retired_key: str, owner: Optional[str] = None) -> bool:
    """Mark an entry untrusted and give up its key (so the next cart claims a new entry): a ready one, or,
    with `owner`, the fetching one that download holds; False when it moved on meanwhile."""
    where = (StagedFile.id == entry_id) & (StagedFile.state == StagedFileState.READY.value)
    if owner is not None:
        where = _held_by(entry_id, owner)
    return bool(StagedFile.update(state=StagedFileState.UNTRUSTED.value, cache_key=retired_key, lease_until=None,
                                  lease_owner=None).where(where).execute())


def pin_staged_files(pins: Sequence[Tuple[int, int, bool]]) -> None:
    """Record (file id, entry id, hit) pins: each file served from its entry; the entries used now, hits
    counted. A few statements per INSERT_CHUNK files."""
    moment = now()
    for chunk in chunked(pins, INSERT_CHUNK):
        File.update(staged_file_id=ById(File.id, [(file_id, entry_id) for file_id, entry_id, _ in chunk])).where(
            File.id.in_([file_id for file_id, _, _ in chunk])).execute()
        hits: Dict[int, int] = {}
        for _, entry_id, hit in chunk:
            hits[entry_id] = hits.get(entry_id, 0) + (1 if hit else 0)
        by_count: Dict[int, List[int]] = {}  # one statement per distinct count (mostly one: each entry once)
        for entry_id, count in hits.items():
            by_count.setdefault(count, []).append(entry_id)
        for count, entry_ids in by_count.items():
            StagedFile.update(last_used=moment, hits=StagedFile.hits + count).where(
                StagedFile.id.in_(entry_ids)).execute()
        bump_counters({(CACHE_HITS, ''): sum(hits.values())})


# A cart in one of these states pins the entries its files were served from, and a ready cart that is not a
# bundle one (its files are served from their links). A failed cart does not: it can never be downloaded,
# and its own links keep the bytes it has until its files are evicted. Nor does a ready bundle cart: every
# byte it serves is in its tar.


def _unpinned() -> Any:
    not_bundle = Cart.bundle.is_null() | (Cart.bundle == False)  # noqa: E712  (SQL, not Python)
    pinning = Cart.status.in_(ACTIVE_STATUSES) | ((Cart.status == CartStatus.READY.value) & not_bundle)
    pinned = (File.select(File.id).join(Cart, on=(File.cart == Cart.id))
              .where((File.staged_file_id == StagedFile.id) & pinning))
    return ~fn.EXISTS(pinned)


def oldest_unpinned_entry(used_before: Optional[datetime.datetime] = None,
                          skipping: Sequence[int] = ()) -> Optional[StagedFile]:
    """The ready or untrusted cache entry no live cart pins, least recently used first (if used before
    `used_before`; not one of `skipping`), or None."""
    where = StagedFile.state.in_([StagedFileState.READY.value, StagedFileState.UNTRUSTED.value]) & _unpinned()
    if used_before is not None:
        where &= StagedFile.last_used < used_before
    if skipping:
        where &= StagedFile.id.not_in(list(skipping))
    return (StagedFile.select(StagedFile.id, StagedFile.archive_id, StagedFile.size, StagedFile.state,
                              StagedFile.last_used)
            .where(where).order_by(StagedFile.last_used, StagedFile.id).first())


def untrusted_entries(limit: int) -> List[StagedFile]:
    """Untrusted cache entries (never linked again), oldest first."""
    return list(StagedFile.select(StagedFile.id, StagedFile.archive_id, StagedFile.size, StagedFile.state,
                                  StagedFile.last_used)
                .where(StagedFile.state == StagedFileState.UNTRUSTED.value)
                .order_by(StagedFile.id).limit(limit))


def claim_entry_removal(entry: StagedFile) -> bool:
    """Delete the row of an entry found by oldest_unpinned_entry or untrusted_entries (its file to unlink
    next), unless it was used, moved or pinned since it was found (compare-and-set on its state and
    last_used): a cart that finds the row afterwards finds nothing and fetches anew."""
    where = (StagedFile.id == entry.id) & (StagedFile.state == entry.state) & (StagedFile.last_used == entry.last_used)
    if entry.state != StagedFileState.UNTRUSTED.value:
        where &= _unpinned()
    return bool(StagedFile.delete().where(where).execute())


def cache_totals() -> Tuple[int, int]:
    """(ready entries, the sum of their sizes) in one aggregate query."""
    row = (StagedFile.select(fn.COUNT(StagedFile.id), fn.COALESCE(fn.SUM(StagedFile.size), 0))
           .where(StagedFile.state == StagedFileState.READY.value).tuples().first())
    return (int(row[0] or 0), int(row[1] or 0)) if row else (0, 0)


# ---- tasks ---------------------------------------------------------------------------

def record_tasks(cart_id: int, task_ids: Sequence[str]) -> None:
    """Remember the queue's ids of a cart's tasks, so a DELETE can revoke them."""
    for task_batch in chunked(task_ids, INSERT_CHUNK):
        CartTasks.insert_many([{'cart': cart_id, 'celery_task_id': task} for task in task_batch]).execute()


def task_ids_of(cart_ids: Sequence[int]) -> List[str]:
    """The queue's ids of every task queued for these carts."""
    return [task.celery_task_id for task in
            CartTasks.select(CartTasks.celery_task_id).where(CartTasks.cart.in_(list(cart_ids)))]


# ---- files ---------------------------------------------------------------------------

def files_to_stage(file_ids: Sequence[int]) -> List[File]:
    """The listed files that are not staged yet, by id."""
    return list(File.select().where(File.id.in_(list(file_ids))
                                    & (File.status != FileStatus.STAGED.value)).order_by(File.id))


def get_file(file_id: int) -> Optional[File]:
    """The file row, or None when its cart was purged."""
    return File.get_or_none(File.id == file_id)


def _size_gain(known: Dict[int, Optional[int]], sizes: Dict[int, int]) -> Tuple[int, int]:
    """(files newly sized, change of the cart's bytes_total) when files whose sizes were `known`
    (None: not known) get these sizes."""
    return (sum(1 for file_id in sizes if known[file_id] is None),
            sum(size - (known[file_id] or 0) for file_id, size in sizes.items()))


MARK_STAGED_TRIES = 5  # a file's state moves forward only: a few reads settle where it was staged from


def _set_staged(rows: Sequence[StagedRow], before: str) -> int:
    """Mark these files staged with their sizes, mtimes and attempts if they are still in `before`
    (compare-and-set); return how many were."""
    changed = 0
    for chunk in chunked(rows, INSERT_CHUNK):
        ids = [row[0] for row in chunk]
        changed += (File.update({File.status: FileStatus.STAGED.value, File.error: '',
                                 File.size: _each(File.id, [(row[0], row[1]) for row in chunk]),
                                 File.mtime: _each(File.id, [(row[0], row[2]) for row in chunk]),
                                 File.attempts: _each(File.id, [(row[0], row[3]) for row in chunk])})
                    .where(File.id.in_(ids) & (File.status == before)).execute())
    return changed


def mark_staged(rows: Sequence[StagedRow]) -> StagedCount:
    """Record those of the files not staged yet as staged, with the size and mtime they arrived with.

    Files already staged (by a duplicate task) are left alone and not counted. Each file moves by
    compare-and-set on the state it was read in, so what it is counted as leaving (on tape,
    transferring) is where it was: the task thread may record a file transferring while the file's
    own thread, which wrote it into the bundle tar in place, records it staged. A file recalled from
    tape is timed from when it was found there (its recall_date, then cleared: timed once).
    """
    wanted = {row[0]: row for row in rows}
    left: Dict[int, Tuple[Optional[int], str, Optional[datetime.datetime]]] = {}  # id -> size, state, recall date
    pending = set(wanted)
    for attempt in range(MARK_STAGED_TRIES):
        if not pending:
            break
        unstaged = File.select(File.id, File.size, File.status, File.recall_date).where(
            File.id.in_(list(pending)) & (File.status != FileStatus.STAGED.value))
        current = {row.id: row for row in _latest(unstaged, locking=attempt > 0)}
        groups: Dict[str, List[int]] = {}
        for file_id, row in current.items():
            groups.setdefault(str(row.status), []).append(file_id)
        for before, file_ids in groups.items():
            if _set_staged([wanted[file_id] for file_id in file_ids], before) == len(file_ids):
                moved = file_ids
            else:  # some moved on meanwhile: those still not staged are tried again from where they are
                moved = [row.id for row in File.select(File.id).where(
                    File.id.in_(file_ids) & (File.status == FileStatus.STAGED.value))]
            left.update({file_id: (current[file_id].size, before, _as_datetime(current[file_id].recall_date))
                         for file_id in moved})
        pending = set(current) - set(left)
    if not left:
        return StagedCount()
    moment = now()
    recalled = {file_id: since for file_id, (_, _, since) in left.items() if since is not None}
    if recalled:  # timed once: a file staged again later (evicted, re-fetched) was not recalled again
        File.update(recall_date=None).where(File.id.in_(list(recalled))).execute()
    sizes = {file_id: wanted[file_id][1] for file_id in left}
    newly_sized, size_change = _size_gain({file_id: size for file_id, (size, _, _) in left.items()}, sizes)

    def were(status: FileStatus) -> int:
        return sum(1 for _, state, _ in left.values() if state == status.value)

    return StagedCount(
        files=len(left), from_tape=were(FileStatus.RECALLING), from_transfer=were(FileStatus.TRANSFERRING),
        newly_sized=newly_sized, size_change=size_change, bytes=sum(sizes.values()),
        recalls=tuple(max((moment - since).total_seconds(), 0.0) for since in recalled.values()))


def mark_transferring(cart_id: int, attempts: Dict[int, int]) -> int:
    """Record that downloads of these files have started, with the downloads started so far of each.

    Compare-and-set on each file's previous state, so a file staged or failed meanwhile (by its
    own thread or a duplicate task) is left alone. A file that was recalling is no longer
    counted on tape. Returns how many files were newly transferring.
    """
    if not attempts:
        return 0
    ended = (FileStatus.STAGED.value, FileStatus.ERROR.value)
    groups: Dict[Tuple[str, int], List[int]] = {}
    for row in File.select(File.id, File.status).where(File.id.in_(list(attempts)) & File.status.not_in(ended)):
        groups.setdefault((str(row.status), attempts[row.id]), []).append(row.id)
    newly = from_tape = 0
    for (before, count), file_ids in groups.items():
        changed = (File.update(status=FileStatus.TRANSFERRING.value, attempts=count)
                   .where(File.id.in_(file_ids) & (File.status == before)).execute())
        if before != FileStatus.TRANSFERRING.value:
            newly += changed
            from_tape += changed if before == FileStatus.RECALLING.value else 0
    if newly:
        Cart.update(files_transferring=Cart.files_transferring + newly,
                    files_on_tape=Cart.files_on_tape - from_tape).where(Cart.id == cart_id).execute()
    return newly


FAIL_FILE_TRIES = 5  # a file's state moves forward only (waiting, recalling, transferring): a few reads suffice


def _latest(query: Any, locking: bool) -> Any:
    """`query`, when `locking`, as a locking read where the database has one: inside a transaction MySQL's
    plain SELECT sees the transaction's snapshot (REPEATABLE READ), so a compare-and-set that lost to another
    writer, retried on what it reads again, would lose every time; a locking read sees the latest row."""
    return query.for_update() if locking and DB.obj.for_update else query


def _file_status(file_id: int, locking: bool = False) -> Optional[str]:
    status = _latest(File.select(File.status).where(File.id == file_id), locking).scalar()
    return None if status is None else str(status)


def fail_file(cart_id: int, file_id: int, cause: str, attempts: int) -> bool:
    """Record a file's failure (after `attempts` downloads started in all) and count it on its cart;
    False when a duplicate task had already staged it.

    Compare-and-set on the state read just before, read again when another writer moved it
    meanwhile: the task's thread records downloads started (transferring) while a download
    fails, and losing that race once left a failed file transferring and its cart staging for
    ever (seen end to end on PostgreSQL).
    """
    for attempt in range(FAIL_FILE_TRIES):
        before = _file_status(file_id, locking=attempt > 0)
        if before is None or before == FileStatus.STAGED.value:
            return False
        if before == FileStatus.ERROR.value:
            return True
        changed = (File.update(status=FileStatus.ERROR.value, error=cause, attempts=attempts)
                   .where((File.id == file_id) & (File.status == before)).execute())
        if changed:
            on_tape = 1 if before == FileStatus.RECALLING.value else 0
            transferring = 1 if before == FileStatus.TRANSFERRING.value else 0
            Cart.update(files_failed=Cart.files_failed + 1, files_on_tape=Cart.files_on_tape - on_tape,
                        files_transferring=Cart.files_transferring - transferring).where(
                Cart.id == cart_id).execute()
            return True
    raise RuntimeError(f'file id {file_id} kept changing state while it was failed')


def mark_recalling(cart_id: int, sizes: Dict[int, Optional[int]]) -> int:
    """Record files found on tape (a recall asked for) as recalling, with the sizes the archive gave;
    count those newly on tape on their cart. Returns how many were newly on tape."""
    if not sizes:
        return 0
    learn_sizes(cart_id, {file_id: size for file_id, size in sizes.items() if size is not None})
    newly = (File.update(status=FileStatus.RECALLING.value,
                         recall_date=fn.COALESCE(File.recall_date, now()))  # a file recalled before keeps its start
             .where(File.id.in_(list(sizes)) & (File.status == FileStatus.WAITING.value)).execute())
    if newly:
        Cart.update(files_on_tape=Cart.files_on_tape + newly).where(Cart.id == cart_id).execute()
    return int(newly)


def learn_sizes(cart_id: int, sizes: Dict[int, int]) -> None:
    """Record the archive's sizes of files not staged yet, and count them in the cart's bytes_total."""
    if not sizes:
        return
    before = {row.id: row.size for row in File.select(File.id, File.size).where(
        File.id.in_(list(sizes)) & (File.status != FileStatus.STAGED.value))}
    changed = {file_id: size for file_id, size in sizes.items() if file_id in before and before[file_id] != size}
    if not changed:
        return
    File.bulk_update([File(id=file_id, size=size) for file_id, size in changed.items()], fields=[File.size],
                     batch_size=INSERT_CHUNK)
    newly, change = _size_gain(before, changed)
    Cart.update(files_sized=Cart.files_sized + newly, bytes_total=Cart.bytes_total + change).where(
        Cart.id == cart_id).execute()


def files_page(cart_id: int, errors_only: bool, limit: int, offset: int) -> List[Tuple[Any, ...]]:
    """(archive id, path, size, status, attempts, error) of a page of the cart's files (or of those in error), by id."""
    query = (File.select(File.file_name, File.bundle_path, File.size, File.status, File.attempts, File.error)
             .where(File.cart == cart_id))
    if errors_only:
        query = query.where(File.status == FileStatus.ERROR.value)
    return cast(List[Tuple[Any, ...]], list(query.order_by(File.id).limit(limit).offset(offset).tuples()))


def tar_place(file_id: int) -> Optional[Tuple[int, Optional[int]]]:
    """(tar_offset, size) recorded for a file placed in its cart's bundle tar, or None if not placed."""
    known = File.select(File.tar_offset, File.size).where(File.id == file_id).first()
    if known is None or known.tar_offset is None:
        return None
    return int(known.tar_offset), known.size


def place_file(cart_id: int, file_id: int, tar_offset: int, size: int) -> None:
    """Record where in the bundle tar a file's `size` bytes go."""
    learn_sizes(cart_id, {file_id: size})
    File.update(tar_offset=tar_offset).where(File.id == file_id).execute()


class TarRow(NamedTuple):
    """What a cart's tar needs of one file row."""

    path: str
    size: int
    mtime: float
    id: int
    tar_offset: Optional[int]


class TarColumns(NamedTuple):
    """A cart's files in tar order as columns (one tuple per field): no object per row."""

    paths: Tuple[str, ...]
    sizes: Tuple[int, ...]
    mtimes: Tuple[float, ...]
    ids: Tuple[int, ...]
    tar_offsets: Tuple[Optional[int], ...]


def _rows_in_tar_order(cart_id: int) -> List[Tuple[Any, ...]]:
    """(path, size, mtime, id, tar_offset) of the files in a cart's tar (all but those that failed, which a
    cart that skips failed files leaves out): those placed in the bundle tar by place, then by id.

    Read straight off the cursor (no model per row): a 100,000-file cart's download starts with it.
    """
    def name(field: Any) -> str:
        return f'{DB.obj.quote[0]}{field.column_name}{DB.obj.quote[1]}'

    cursor = DB.execute_sql(
        f'SELECT {name(File.bundle_path)}, COALESCE({name(File.size)}, 0), COALESCE({name(File.mtime)}, 0), '
        f'{name(File.id)}, {name(File.tar_offset)} FROM {DB.obj.quote[0]}{File._meta.table_name}{DB.obj.quote[1]} '
        f'WHERE {name(File.cart)} = {DB.obj.param} AND {name(File.status)} <> {DB.obj.param} '
        f'ORDER BY CASE WHEN {name(File.tar_offset)} IS NULL THEN 1 ELSE 0 END, {name(File.tar_offset)}, '
        f'{name(File.id)}', (cart_id, FileStatus.ERROR.value))
    return cursor.fetchall()


def files_in_tar_order(cart_id: int) -> List[TarRow]:
    """A cart's files in their tar's order, a TarRow each (see _rows_in_tar_order)."""
    return list(map(TarRow._make, _rows_in_tar_order(cart_id)))


def tar_columns(cart_id: int) -> TarColumns:
    """A cart's files in their tar's order as columns: what a download lays out, at a few µs less a file."""
    rows = _rows_in_tar_order(cart_id)
    if not rows:
        return TarColumns((), (), (), (), ())
    return TarColumns(*zip(*rows, strict=True))


def failed_files(cart_id: int) -> List[Tuple[str, str, str]]:
    """(path, archive id, error) of the cart's files in error, by id."""
    return [(str(row.bundle_path), str(row.file_name), str(row.error or '')) for row in
            File.select(File.bundle_path, File.file_name, File.error)
            .where((File.cart == cart_id) & (File.status == FileStatus.ERROR.value)).order_by(File.id)]


def unfinished_file_ids(cart_id: int) -> List[int]:
    """A cart's files that are neither staged nor failed."""
    return [row.id for row in File.select(File.id).where(
        (File.cart == cart_id) & File.status.not_in((FileStatus.STAGED.value, FileStatus.ERROR.value)))]


def staged_files(cart_id: int) -> List[File]:
    """(id, path, tar_offset) of a cart's staged files."""
    return list(File.select(File.id, File.bundle_path, File.tar_offset).where(
        (File.cart == cart_id) & (File.status == FileStatus.STAGED.value)))


def mark_waiting(cart_id: int, file_ids: Sequence[int]) -> None:
    """Put staged files (whose bytes are lost) and every failed file of the cart back to waiting."""
    if file_ids:
        File.update(status=FileStatus.WAITING.value).where(File.id.in_(list(file_ids))).execute()
    File.update(status=FileStatus.WAITING.value, error='').where(
        (File.cart == cart_id) & (File.status == FileStatus.ERROR.value)).execute()


def unstaged_file_ids(cart_id: int) -> List[int]:
    """The cart's files not staged yet, by id."""
    return [row.id for row in File.select(File.id).where(
        (File.cart == cart_id) & (File.status != FileStatus.STAGED.value)).order_by(File.id)]


def file_rows_of(cart_ids: Sequence[int]) -> Iterable[Dict[str, Any]]:
    """Every file row of these carts, as dicts, by id."""
    return cast(Iterable[Dict[str, Any]], File.select().where(File.cart.in_(list(cart_ids))).order_by(File.id).dicts())


# ---- space reservations ---------------------------------------------------------------

def add_reservation(cart_id: int, file_id: int, size: int, partial: Optional[str], tar_offset: Optional[int]) -> None:
    """Record a file's download in flight (replacing an older record of the same file)."""
    SpaceReservation.delete().where(SpaceReservation.file == file_id).execute()
    SpaceReservation.create(file=file_id, cart=cart_id, bytes=size, partial=partial, tar_offset=tar_offset)


def set_reservation_partial(file_id: int, partial: str) -> None:
    """Say which temp file a reserved download writes now."""
    SpaceReservation.update(partial=partial).where(SpaceReservation.file == file_id).execute()


def drop_reservations(file_ids: Sequence[int]) -> None:
    """Forget the reservations of these files."""
    SpaceReservation.delete().where(SpaceReservation.file.in_(list(file_ids))).execute()


def drop_cart_reservations(cart_id: int) -> None:
    """Forget every reservation of a cart."""
    SpaceReservation.delete().where(SpaceReservation.cart == cart_id).execute()


def reservations_in_flight(excluding_file_id: int) -> List[SpaceReservation]:
    """(bytes, partial, tar_offset) of every reservation but this file's, leaving out deleted carts' rows."""
    return list(SpaceReservation.select(SpaceReservation.bytes, SpaceReservation.partial, SpaceReservation.tar_offset)
                .join(Cart, on=(SpaceReservation.cart == Cart.id))
                .where((SpaceReservation.file != excluding_file_id)
                       & (Cart.status != CartStatus.DELETED.value)))


# ---- workers --------------------------------------------------------------------------

def record_worker_seen(name: str, pid: int, started: datetime.datetime) -> None:
    """Say that the worker `name` (process `pid`, started at `started`) is here now."""
    moment = now()
    updated = (WorkerSighting.update(pid=pid, started_date=started, seen_date=moment)
               .where(WorkerSighting.name == name).execute())
    if updated or WorkerSighting.get_or_none(WorkerSighting.name == name) is not None:
        return  # MySQL counts rows changed: a second sighting within the same second changes none
    try:
        with DB.atomic():
            WorkerSighting.create(name=name, pid=pid, started_date=started, seen_date=moment)
    except IntegrityError:  # another process of the same name inserted it first: it is seen
        pass


def forget_worker(name: str, pid: int) -> None:
    """Remove the row of a worker that is stopping (unless the name was taken over by another process)."""
    WorkerSighting.delete().where((WorkerSighting.name == name) & (WorkerSighting.pid == pid)).execute()


def workers_seen_since(moment: datetime.datetime) -> Tuple[int, Optional[datetime.datetime]]:
    """(workers seen at or after `moment`, when any worker was seen last, or None if none ever was)."""
    row = (WorkerSighting.select(fn.SUM(Case(None, [(WorkerSighting.seen_date >= moment, 1)], 0)),
                                 fn.MAX(WorkerSighting.seen_date)).tuples().first())
    if row is None:
        return 0, None
    return int(row[0] or 0), _as_datetime(row[1])


# ---- counters and the metrics' snapshot ------------------------------------------------

def seed_counters() -> None:
    """Make the counter rows that are missing (at 0)."""
    existing = {(row.name, row.label) for row in CartCounter.select(CartCounter.name, CartCounter.label)}
    for name, label in COUNTER_ROWS:
        if (name, label) not in existing:
            CartCounter.create(name=name, label=label, value=0)


def bump_counters(amounts: Dict[Tuple[str, str], int]) -> None:
    """Add to counters, in one UPDATE, inside the caller's transaction (amounts of 0 left out).

    Only positive amounts, so on MySQL (whose row count is rows changed) every matched row
    counts; a row found missing (a database whose rows were removed by hand) is made.
    """
    wanted = {key: amount for key, amount in amounts.items() if amount > 0}
    if not wanted:
        return
    keys = list(wanted)
    matches = [(CartCounter.name == name) & (CartCounter.label == label) for name, label in keys]
    where = functools.reduce(operator.or_, matches)
    increment = CartCounter.value + Case(None, [(match, wanted[key]) for match, key in zip(matches, keys, strict=True)],
                                         0)
    changed = CartCounter.update(value=increment).where(where).execute()
    if changed < len(keys):
        existing = {(row.name, row.label) for row in CartCounter.select(CartCounter.name, CartCounter.label)
                    .where(where)}
        for name, label in keys:
            if (name, label) not in existing:
                CartCounter.create(name=name, label=label, value=wanted[(name, label)])


def count_files_staged(count: StagedCount) -> None:
    """Count files recorded staged and their bytes (last in the batch's transaction: every batch of every
    worker updates these two rows, so their row locks are held only until the commit that follows)."""
    bump_counters({(FILES_STAGED, ''): count.files, (STAGED_BYTES, ''): count.bytes})


def count_hash_mismatches(count: int) -> None:
    """Count downloads whose bytes did not have the hash the client gave."""
    bump_counters({(HASH_MISMATCHES, ''): count})


def counter_values() -> Dict[Tuple[str, str], int]:
    """Every counter's value by (name, label)."""
    rows = cast(Iterable[Tuple[Any, Any, Any]],
                CartCounter.select(CartCounter.name, CartCounter.label, CartCounter.value).tuples())
    return {(str(name), str(label)): int(value or 0) for name, label, value in rows}


class Snapshot(NamedTuple):
    """What the metrics read of the database at a scrape: carts by status, the files of the carts being
    worked on by state, when the oldest of those carts was made, and the bytes reserved by downloads."""

    carts: Dict[str, int]
    files: Dict[str, int]
    oldest_active: Optional[datetime.datetime]
    reserved_bytes: int
    cache_entries: int = 0  # ready entries of the staged-file cache
    cache_bytes: int = 0  # and the sum of their sizes


def metrics_snapshot() -> Snapshot:
    """The snapshot in four aggregate queries (none per cart or per file): carts grouped by status,
    the counters of the carts being worked on summed, the reservations of live carts summed, the ready
    entries of the staged-file cache counted and their sizes summed."""
    by_status = cast(Iterable[Tuple[Any, Any]], Cart.select(Cart.status, fn.COUNT(Cart.id)).group_by(Cart.status)
                     .tuples())
    carts = {str(status): int(count) for status, count in by_status}
    row = (Cart.select(fn.MIN(Cart.creation_date), fn.SUM(Cart.files_total), fn.SUM(Cart.files_staged),
                       fn.SUM(Cart.files_failed), fn.SUM(Cart.files_on_tape), fn.SUM(Cart.files_transferring))
           .where(Cart.status.in_(ACTIVE_STATUSES)).tuples().first())
    oldest, total, staged, failed, on_tape, transferring = (row or (None, 0, 0, 0, 0, 0))
    total, staged, failed, on_tape, transferring = (int(value or 0) for value in
                                                    (total, staged, failed, on_tape, transferring))
    files = {'on_tape': on_tape, 'transferring': transferring, 'staged': staged, 'failed': failed,
             'queued': max(total - staged - failed - on_tape - transferring, 0)}
    reserved = (SpaceReservation.select(fn.COALESCE(fn.SUM(SpaceReservation.bytes), 0))
                .join(Cart, on=(SpaceReservation.cart == Cart.id))
                .where(Cart.status != CartStatus.DELETED.value).scalar())
    entries, cached = cache_totals()
    return Snapshot(carts, files, _as_datetime(oldest), int(reserved or 0), entries, cached)
