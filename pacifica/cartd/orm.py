"""Peewee models of carts, their files and tasks, bound to a proxy so nothing connects at import."""
from __future__ import annotations

import datetime
import enum

from peewee import (
    SQL,
    AutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    DatabaseProxy,
    DateTimeField,
    DoubleField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

DB = DatabaseProxy()


class CartStatus(str, enum.Enum):
    """A cart's state as stored; the wire shows only staging, ready and error."""

    WAITING = 'waiting'
    STAGING = 'staging'
    BUNDLING = 'bundling'
    READY = 'ready'
    ERROR = 'error'
    DELETED = 'deleted'

    @property
    def wire(self) -> str:
        """The X-Pacifica-Status value: clients only ever see staging until ready or error."""
        if self in (CartStatus.WAITING, CartStatus.BUNDLING):
            return CartStatus.STAGING.value
        return self.value


class FileStatus(str, enum.Enum):
    """A file's state: waiting to be pulled, staged (on disk and verified), or failed."""

    WAITING = 'waiting'
    STAGING = 'staging'
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


MODELS = (CartSystem, Cart, File, CartTasks, SpaceReservation)
