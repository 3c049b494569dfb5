"""The database schema's version, its ordered upgrade steps, and the start-up check."""
from __future__ import annotations

import logging
from typing import Any, Callable, List, Optional, Sequence, Tuple

from peewee import Field, fn
from playhouse.migrate import MySQLMigrator, SchemaMigrator, migrate

from .errors import SchemaTooOld
from .orm import (DB, MODELS, Cart, CartCounter, CartEvent, CartStatus, CartSystem, File, FileStatus,
                  SpaceReservation, StagedFile, WorkerSighting, counters_from_rows, fill_archive_keys, seed_counters)

LOGGER = logging.getLogger(__name__)

Version = Tuple[int, int]

# 2.0 is the published 0.7.0 schema. 2.1 adds per-cart counters and per-file size/mtime;
# 2.2 adds where a bundle's files are written in its tar; 2.3 adds the progress counters
# HEAD reports and when a cart became ready; 2.4 adds what GET /<uid>/status reports (the
# downloads started per file, the files transferring and the high-water percent of a cart);
# 2.5 adds a cart's lifetime and when it expires; 2.6 whether it skips files it cannot stage;
# 2.7 the table of the workers' last sightings; 2.8 the completion events' outbox (table
# cartevent) and a cart's callback_url; 2.9 the table of fleet-wide counters the metrics report
# (cartcounter) and when a file was first found on tape (file.recall_date);
# 2.10 the staged-file cache (table stagedfile) and the pin of a file on the entry it was served
# from (file.staged_file_id, indexed); 2.11 the cache entries' archive_key (indexed), to look a cart's
# files up by the archive's ids alone.
# All new columns have server-side defaults or are nullable, so a 0.7.0 process can still
# write to the database.
SCHEMA_VERSION: Version = (2, 11)


def current_version() -> Optional[Version]:
    """Return the stored schema version, or None when the database is empty."""
    if not CartSystem.table_exists():
        return None
    rows = {row.part: row.value for row in CartSystem.select()}
    if 'major' not in rows or 'minor' not in rows:
        return None
    return (rows['major'], rows['minor'])


def _store_version(version: Version) -> None:
    # Decide insert or update by what exists: MySQL's row count of an UPDATE is the rows
    # changed, not matched, so it is 0 when a part (e.g. 'major') keeps its value.
    existing = {row.part for row in CartSystem.select(CartSystem.part)}
    for part, value in zip(('major', 'minor'), version, strict=True):
        if part in existing:
            CartSystem.update(value=value).where(CartSystem.part == part).execute()
        else:
            CartSystem.create(part=part, value=value)


def _add_missing_columns(migrator: SchemaMigrator, wanted: List[Tuple[str, str, Any]]) -> List[Any]:
    """Operations adding the columns not there yet: MySQL commits each ALTER at once, so an
    interrupted upgrade can leave some added with the version unchanged, and a rerun adds the rest."""
    columns = {table: {column.name for column in DB.get_columns(table)} for table, _, _ in wanted}
    return [migrator.add_column(table, name, field) for table, name, field in wanted if name not in columns[table]]


def _add_columns(migrator: SchemaMigrator, wanted: Sequence[Tuple[str, Field]]) -> List[Any]:
    """Operations adding the columns not there yet and, on MySQL, putting back each NOT NULL one's
    server-side default: MySQL's add_not_null re-declares the column (MODIFY ... NOT NULL) without
    its DEFAULT, and a 0.7.0 writer could then not insert."""
    operations = _add_missing_columns(migrator, [(table, field.column_name, field) for table, field in wanted])
    if isinstance(migrator, MySQLMigrator):
        operations += [migrator.add_column_default(table, field.column_name, field.default)
                       for table, field in wanted if not field.null]
    return operations


def _upgrade_2_0_to_2_1() -> None:
    """Add the counters and file metadata, then fill the counters from the existing rows (resumable)."""
    migrator = SchemaMigrator.from_database(DB.obj)
    indexes = {index.name for index in DB.get_indexes('cart')}
    operations = _add_columns(migrator, [('cart', Cart.files_total), ('cart', Cart.files_staged),
                                         ('file', File.size), ('file', File.mtime)])
    if 'cart_cart_uid' not in indexes:
        operations.append(migrator.add_index('cart', ('cart_uid',), False))
    migrate(*operations)
    DB.create_tables([SpaceReservation], safe=True)
    total = File.select(fn.COUNT(File.id)).where(File.cart == Cart.id)
    staged = total.where(File.status == FileStatus.STAGED.value)
    Cart.update(files_total=total, files_staged=staged).execute()


def _upgrade_2_1_to_2_2() -> None:
    """Add the bundle tar's layout columns (resumable). Existing carts keep bundle_size 0: their
    tars are laid out when they are bundled, as before."""
    migrator = SchemaMigrator.from_database(DB.obj)
    migrate(*_add_columns(migrator, [('cart', Cart.bundle_size), ('file', File.tar_offset),
                                     ('spacereservation', SpaceReservation.tar_offset)]))


PROGRESS_COLUMNS = ('files_failed', 'files_on_tape', 'files_sized', 'bytes_total', 'bytes_staged')


def _upgrade_2_2_to_2_3() -> None:
    """Add the progress counters and ready_date, then fill the counters from the file rows (resumable).

    A ready cart's ready_date is its last update, the best there is (it may have been downloaded since).
    """
    migrator = SchemaMigrator.from_database(DB.obj)
    migrate(*_add_columns(migrator, [('cart', getattr(Cart, name)) for name in PROGRESS_COLUMNS]
                          + [('cart', Cart.ready_date)]))
    Cart.update({field: value for field, value in counters_from_rows().items()
                 if field.name != 'files_transferring'}).execute()  # a 2.4 column
    Cart.update(ready_date=Cart.updated_date).where(
        (Cart.status == CartStatus.READY.value) & Cart.ready_date.is_null()).execute()


def _upgrade_2_3_to_2_4() -> None:
    """Add the status document's columns (resumable). No file is transferring in an older database
    (it had no such state) and no download count is known: both start at 0, as does the percent,
    which the next staged file raises."""
    migrator = SchemaMigrator.from_database(DB.obj)
    migrate(*_add_columns(migrator, [('cart', Cart.files_transferring), ('cart', Cart.percent_staged),
                                     ('file', File.attempts)]))


def _upgrade_2_4_to_2_5() -> None:
    """Add the lifetime columns (resumable). Existing carts keep lifetime 0: they never expire, as before."""
    migrator = SchemaMigrator.from_database(DB.obj)
    migrate(*_add_columns(migrator, [('cart', Cart.lifetime), ('cart', Cart.expires_date)]))


def _upgrade_2_5_to_2_6() -> None:
    """Add on_file_error (resumable). Existing carts keep 'fail': a file that cannot be staged fails its cart."""
    migrator = SchemaMigrator.from_database(DB.obj)
    migrate(*_add_columns(migrator, [('cart', Cart.on_file_error)]))


def _upgrade_2_6_to_2_7() -> None:
    """Add the workers' sightings table (resumable: made only if missing). It starts empty: a server
    then warns that no worker is seen until the first upgraded worker checks in."""
    DB.create_tables([WorkerSighting], safe=True)


def _upgrade_2_7_to_2_8() -> None:
    """Add the event outbox and callback_url (resumable). Existing carts have no callback: their
    events, if a [notifications] url is set, go there only."""
    migrator = SchemaMigrator.from_database(DB.obj)
    migrate(*_add_columns(migrator, [('cart', Cart.callback_url)]))
    DB.create_tables([CartEvent], safe=True)


def _upgrade_2_8_to_2_9() -> None:
    """Add when a file was first found on tape, and the counters table with its rows at 0 (resumable: each
    made if missing). The counters start at this upgrade: what was done before is not counted; files
    recalling now have no start and their recalls are not timed."""
    migrator = SchemaMigrator.from_database(DB.obj)
    migrate(*_add_columns(migrator, [('file', File.recall_date)]))
    DB.create_tables([CartCounter], safe=True)
    seed_counters()


def _add_indexed_column(migrator: SchemaMigrator, table: str, field: Field) -> None:
    """Add a column with its index, or the index of a column there is (resumable: adding the column adds
    its index, and an upgrade cut off between the two, as MySQL commits each ALTER at once, gets the
    index on the rerun)."""
    had_column = field.column_name in {column.name for column in DB.get_columns(table)}
    operations = _add_columns(migrator, [(table, field)])
    if had_column and not any(tuple(index.columns) == (field.column_name,) for index in DB.get_indexes(table)):
        operations.append(migrator.add_index(table, (field.column_name,), False))
    migrate(*operations)


def _upgrade_2_9_to_2_10() -> None:
    """Add the staged-file cache and file.staged_file_id with its index (resumable). Existing files have no
    pin (NULL): they were staged into their carts alone, as 0.7.0 stages them."""
    _add_indexed_column(SchemaMigrator.from_database(DB.obj), 'file', File.staged_file_id)
    DB.create_tables([StagedFile], safe=True)  # as the code has it now (with 2.11's column: 2.11 then adds nothing)


def _upgrade_2_10_to_2_11() -> None:
    """Add stagedfile.archive_key with its index and fill it in for the entries there are, and index
    stagedfile.last_used (resumable)."""
    migrator = SchemaMigrator.from_database(DB.obj)
    _add_indexed_column(migrator, 'stagedfile', StagedFile.archive_key)
    _add_indexed_column(migrator, 'stagedfile', StagedFile.last_used)  # the column is there: its index only
    fill_archive_keys()


UPGRADES: List[Tuple[Version, Version, Callable[[], None]]] = [
    ((2, 0), (2, 1), _upgrade_2_0_to_2_1),
    ((2, 1), (2, 2), _upgrade_2_1_to_2_2),
    ((2, 2), (2, 3), _upgrade_2_2_to_2_3),
    ((2, 3), (2, 4), _upgrade_2_3_to_2_4),
    ((2, 4), (2, 5), _upgrade_2_4_to_2_5),
    ((2, 5), (2, 6), _upgrade_2_5_to_2_6),
    ((2, 6), (2, 7), _upgrade_2_6_to_2_7),
    ((2, 7), (2, 8), _upgrade_2_7_to_2_8),
    ((2, 8), (2, 9), _upgrade_2_8_to_2_9),
    ((2, 9), (2, 10), _upgrade_2_9_to_2_10),
    ((2, 10), (2, 11), _upgrade_2_10_to_2_11),
]


def sync() -> Version:
    """Create the schema, or upgrade it step by step to SCHEMA_VERSION, keeping every row."""
    with DB.atomic():
        version = current_version()
        if version is None:
            DB.create_tables(MODELS, safe=True)
            seed_counters()
            _store_version(SCHEMA_VERSION)
            LOGGER.info('created schema %d.%d', *SCHEMA_VERSION)
            return SCHEMA_VERSION
    for from_version, to_version, step in UPGRADES:
        if version == from_version:
            with DB.atomic():
                step()
                _store_version(to_version)
            LOGGER.info('upgraded schema %d.%d to %d.%d', *from_version, *to_version)
            version = to_version
    if version[0] != SCHEMA_VERSION[0] or version < SCHEMA_VERSION:
        raise SchemaTooOld(f'cannot upgrade schema {version[0]}.{version[1]} to '
                           f'{SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}')
    return version


def is_equal() -> bool:
    """Say whether the stored schema is exactly this code's."""
    return current_version() == SCHEMA_VERSION


def is_usable() -> bool:
    """Say whether this code can run on the stored schema (same major, minor not older)."""
    version = current_version()
    return version is not None and version[0] == SCHEMA_VERSION[0] and version >= SCHEMA_VERSION


def require_usable() -> None:
    """Raise SchemaTooOld with the fix in the message unless the schema is usable."""
    version = current_version()
    if version is None:
        raise SchemaTooOld('the database has no cart schema: run `pacifica-cartd-cmd dbsync` first')
    if not is_usable():
        raise SchemaTooOld(
            f'database schema {version[0]}.{version[1]} does not match this version '
            f'({SCHEMA_VERSION[0]}.{SCHEMA_VERSION[1]}): run `pacifica-cartd-cmd dbsync`')
