"""Download bodies: transport.response_body over bytes and file ranges, and CartDownload.pieces over a tar layout.

Real files in tmp_path; the server's sendfile is a fake that copies from the handle it is
given into a buffer (the "socket"), so what a client would receive can be compared byte
for byte, and short sends can be made on purpose.
"""
from __future__ import annotations

import datetime
import os
import pathlib
from typing import Any, BinaryIO, List, Optional, Tuple

import pytest

from pacifica.cartd import carts, database, schema, transport
from pacifica.cartd.carts import CartDownload
from pacifica.cartd.config import load_settings
from pacifica.cartd.eviction import DOWNLOAD_HEARTBEAT_S
from pacifica.cartd.orm import Cart, insert_cart
from pacifica.cartd.tarlayout import FileRange, TarLayout, TarMember
from pacifica.cartd.transport import response_body


MAX_SENDS = 1000  # a body that keeps calling sendfile fails instead of looping


class FakeSendFile:
    """A server's sendfile: records (file name, offset, count) and writes what it reads to `wire`.

    `most` caps each send, as a socket may send fewer bytes than asked.
    """

    def __init__(self, wire: List[bytes], most: Optional[int] = None) -> None:
        self.wire = wire
        self.most = most
        self.calls: List[Tuple[str, int, int]] = []
        self.handles: List[BinaryIO] = []

    def __call__(self, handle: BinaryIO, offset: int, count: int) -> int:
        assert len(self.calls) < MAX_SENDS, 'sendfile called over and over'
        self.calls.append((handle.name, offset, count))
        self.handles.append(handle)
        handle.seek(offset)
        data = handle.read(count if self.most is None else min(count, self.most))
        self.wire.append(data)
        return len(data)


@pytest.fixture
def sources(tmp_path: pathlib.Path) -> Tuple[pathlib.Path, pathlib.Path]:
    first = tmp_path / 'first.bin'
    first.write_bytes(bytes(range(256)) * 12)  # 3072 bytes
    second = tmp_path / 'second.bin'
    second.write_bytes(b'0123456789' * 77)  # 770 bytes
    return first, second


def sample_pieces(first: pathlib.Path, second: pathlib.Path) -> List[Any]:
    return [b'HEAD', FileRange(first, 5, 2500), b'MIDDLE', FileRange(second, 0, 770), b'', b'TRAILER']


def expected_bytes(first: pathlib.Path, second: pathlib.Path) -> bytes:
    return b'HEAD' + first.read_bytes()[5:2505] + b'MIDDLE' + second.read_bytes() + b'TRAILER'


def drain(body: Any, wire: List[bytes]) -> List[bytes]:
    """Take the body as a server would, writing each yielded chunk to `wire`; return the chunks."""
    yielded = []
    for chunk in body:
        yielded.append(chunk)
        wire.append(chunk)
    return yielded


# ---- response_body without sendfile ---------------------------------------------------

GATHER = 1000  # transport.GATHER_BYTES in these tests: the 2,500-byte range is long, the 770-byte one short


@pytest.fixture(autouse=True)
def small_gather(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, 'GATHER_BYTES', GATHER)


def test_without_sendfile_every_byte_is_yielded_short_pieces_gathered(
        sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    first, second = sources
    chunks = list(response_body(sample_pieces(first, second), 1000))
    assert b''.join(chunks) == expected_bytes(first, second)
    # HEAD before the long range; the long range in chunks; MIDDLE + the short file + TRAILER as one write
    assert [len(chunk) for chunk in chunks] == [4, 1000, 1000, 500, 6 + 770 + 7]


@pytest.mark.parametrize('chunk_size', [1, 7, 256, 2500, 1 << 20])
def test_without_sendfile_no_chunk_of_a_long_range_is_longer_than_chunk_size(
        sources: Tuple[pathlib.Path, pathlib.Path], chunk_size: int) -> None:
    first, _ = sources
    chunks = list(response_body([FileRange(first, 3, 2500)], chunk_size))
    assert b''.join(chunks) == first.read_bytes()[3:2503]
    assert max(len(chunk) for chunk in chunks) == min(chunk_size, 2500)


def test_many_short_pieces_go_out_in_few_writes_of_about_gather_bytes(
        sources: Tuple[pathlib.Path, pathlib.Path], monkeypatch: pytest.MonkeyPatch) -> None:
    first, _ = sources
    opened: List[str] = []
    real_open = os.open

    def counting_open(path: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, 'open', counting_open)
    pieces: List[Any] = []
    for index in range(300):
        pieces += [b'h' * 20, FileRange(first, index, 10), b'\0' * 6]
    chunks = list(response_body(pieces, 1 << 20))
    assert b''.join(chunks) == b''.join(b'h' * 20 + first.read_bytes()[index:index + 10] + b'\0' * 6
                                        for index in range(300))
    assert all(GATHER <= len(chunk) < 2 * GATHER for chunk in chunks[:-1]) and len(chunks) == 11
    assert opened == [str(first)]  # consecutive ranges of one file (a bundle tar) share one open file


def test_without_sendfile_a_file_shorter_than_recorded_raises(sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    first, _ = sources
    for piece in (FileRange(first, 3000, 100), FileRange(first, 1000, 2500)):  # short, then long
        with pytest.raises(OSError, match='shorter than the cart recorded'):
            list(response_body([piece], 1000))


# ---- response_body with the server's sendfile ------------------------------------------

def test_with_sendfile_only_gathered_bytes_are_yielded(sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    first, second = sources
    wire: List[bytes] = []
    send_file = FakeSendFile(wire)
    yielded = drain(response_body(sample_pieces(first, second), 1000, send_file), wire)
    assert yielded == [b'HEAD', b'MIDDLE' + second.read_bytes() + b'TRAILER']
    assert b''.join(wire) == expected_bytes(first, second)  # every file byte, in place between the headers
    assert send_file.calls == [(str(first), 5, 2500)]  # the short file is read into the last write
    assert all(handle.closed for handle in send_file.handles)


def test_with_sendfile_each_range_is_sent_before_the_next_piece_is_taken(
        sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    first, second = sources
    wire: List[bytes] = []
    send_file = FakeSendFile(wire)
    body = response_body(sample_pieces(first, second), 1000, send_file)
    assert next(body) == b'HEAD'
    assert send_file.calls == []  # nothing is sent ahead of what was yielded
    assert next(body).startswith(b'MIDDLE')
    assert send_file.calls == [(str(first), 5, 2500)]


def test_short_sends_are_continued_from_where_they_stopped(sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    first, second = sources
    wire: List[bytes] = []
    send_file = FakeSendFile(wire, most=700)
    drain(response_body(sample_pieces(first, second), 1000, send_file), wire)
    assert b''.join(wire) == expected_bytes(first, second)
    assert send_file.calls == [
        (str(first), 5, 2500), (str(first), 705, 1800), (str(first), 1405, 1100), (str(first), 2105, 400),
    ]


def test_a_sendfile_that_sends_nothing_raises(sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    """A file shorter than recorded: sendfile reaches its end and sends 0 bytes."""
    first, _ = sources
    wire: List[bytes] = []
    send_file = FakeSendFile(wire, most=1000)
    with pytest.raises(OSError, match='shorter than the cart recorded'):
        drain(response_body([b'HEAD', FileRange(first, 2000, 2000), b'NEVER'], 1000, send_file), wire)
    assert send_file.calls == [(str(first), 2000, 2000), (str(first), 3000, 1000), (str(first), 3072, 928)]
    assert b''.join(wire) == b'HEAD' + first.read_bytes()[2000:]


def test_a_sendfile_that_returns_a_negative_count_raises(sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    first, _ = sources
    calls: List[int] = []

    def send_file(handle: BinaryIO, offset: int, count: int) -> int:
        assert len(calls) < MAX_SENDS, 'sendfile called over and over'
        calls.append(count)
        return -1

    with pytest.raises(OSError, match='shorter than the cart recorded'):
        list(response_body([FileRange(first, 0, 2000)], 1000, send_file))
    assert calls == [2000]


# ---- CartDownload.pieces ---------------------------------------------------------------

PIECE = 1000


class CountingHeartbeat:
    """Stands in for heartbeat.Heartbeat: records its construction and each call in a shared log."""

    log: List[Any] = []
    made: List[Tuple[int, float]] = []

    def __init__(self, cart_id: int, interval: float) -> None:
        CountingHeartbeat.made.append((cart_id, interval))

    def __call__(self) -> None:
        CountingHeartbeat.log.append('beat')


@pytest.fixture
def layout(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> TarLayout:
    """A tar of a file several PIECE_BYTES long, a short one and an empty one; PIECE_BYTES made small."""
    monkeypatch.setattr(carts, 'PIECE_BYTES', PIECE)
    monkeypatch.setattr(CountingHeartbeat, 'log', [])
    monkeypatch.setattr(CountingHeartbeat, 'made', [])
    monkeypatch.setattr(carts, 'Heartbeat', CountingHeartbeat)
    big = tmp_path / 'big'
    big.write_bytes(bytes((index * 7) % 251 for index in range(3 * PIECE + 456)))
    small = tmp_path / 'small'
    small.write_bytes(b'small file')
    empty = tmp_path / 'empty'
    empty.write_bytes(b'')
    members = [TarMember('d/big.dat', big.stat().st_size, 1600000000.0, big),
               TarMember('small.txt', small.stat().st_size, 1600000000.0, small),
               TarMember('d/e/empty', 0, 1600000000.0, empty)]
    return TarLayout('top', members, 1500000000.0)


def ranges(layout: TarLayout) -> List[Tuple[int, int]]:
    big_at, small_at = layout.file_offsets[0], layout.file_offsets[1]
    return [
        (0, layout.size),
        (10, 20),
        (0, big_at),  # headers only
        (big_at, big_at + 3 * PIECE + 456),  # exactly the big file
        (big_at - 5, big_at + 2500),
        (big_at + 999, big_at + 1001),  # across a piece boundary of the big file
        (big_at + 1, small_at + 3),
        (layout.size - 1, layout.size),
    ]


def read_pieces(pieces: Any) -> bytes:
    return b''.join(piece if isinstance(piece, bytes) else b''.join(piece.read(1 << 20)) for piece in pieces)


def test_pieces_join_to_the_layouts_bytes(layout: TarLayout) -> None:
    download = CartDownload(layout, 'top.tar', 42)
    for start, end in ranges(layout):
        pieces = list(download.pieces(start, end))
        assert read_pieces(pieces) == b''.join(layout.iter_bytes(start, end)), (start, end)
        assert sum(len(piece) if isinstance(piece, bytes) else piece.length for piece in pieces) == end - start


def test_file_ranges_are_at_most_piece_bytes(layout: TarLayout) -> None:
    download = CartDownload(layout, 'top.tar', 42)
    for start, end in ranges(layout):
        file_ranges = [piece for piece in download.pieces(start, end) if isinstance(piece, FileRange)]
        assert all(0 < piece.length <= PIECE for piece in file_ranges), (start, end)
    # the big file is handed out in PIECE_BYTES parts, not as one range
    big_at = layout.file_offsets[0]
    whole_file = [piece.length for piece in download.pieces(big_at, big_at + 3 * PIECE + 456)]
    assert whole_file == [PIECE, PIECE, PIECE, 456]


def test_the_cart_is_marked_used_between_file_pieces(layout: TarLayout) -> None:
    download = CartDownload(layout, 'top.tar', 42)
    log = CountingHeartbeat.log
    file_parts = 0
    for piece in download.pieces(0, layout.size):
        if isinstance(piece, FileRange):
            # the previous file part was followed by a heartbeat before this one came
            assert log.count('beat') == file_parts
            file_parts += 1
            log.append('file')
        else:
            log.append('bytes')
    assert CountingHeartbeat.made == [(42, DOWNLOAD_HEARTBEAT_S)]
    assert file_parts == 5  # four parts of the big file and the small one (the empty file has none)
    assert log.count('beat') == file_parts
    # every beat directly follows a file part
    assert all(log[index - 1] == 'file' for index, entry in enumerate(log) if entry == 'beat')


def test_header_only_ranges_need_no_heartbeat(layout: TarLayout) -> None:
    download = CartDownload(layout, 'top.tar', 42)
    pieces = list(download.pieces(0, layout.file_offsets[0]))
    assert all(isinstance(piece, bytes) for piece in pieces)
    assert CountingHeartbeat.log == []


def test_a_real_heartbeat_marks_the_cart_used_while_its_tar_is_read(tmp_path: pathlib.Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With the heartbeat's interval at 0, reading a file piece dates the cart's row now."""
    settings = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(tmp_path / 'volume'), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3'})
    database.bind(settings)
    with database.connection():
        schema.sync()
        cart_id, _ = insert_cart('hb', False, [], 0)
        Cart.update(updated_date=datetime.datetime(2001, 1, 1)).where(Cart.id == cart_id).execute()
    monkeypatch.setattr(carts, 'DOWNLOAD_HEARTBEAT_S', 0.0)
    source = tmp_path / 'data'
    source.write_bytes(b'x' * 10)
    layout = TarLayout('top', [TarMember('data', 10, 1600000000.0, source)], 1500000000.0)
    download = CartDownload(layout, 'top.tar', cart_id)
    pieces = download.pieces(0, layout.size)
    while not isinstance(next(pieces), FileRange):
        pass
    with database.connection():
        assert Cart.get_by_id(cart_id).updated_date == datetime.datetime(2001, 1, 1)
    list(pieces)  # the reader comes back for more: the cart is marked used
    with database.connection():
        assert Cart.get_by_id(cart_id).updated_date > datetime.datetime.now() - datetime.timedelta(minutes=5)


# ---- a range first, and socket_sendfile (uWSGI's) ---------------------------------------

def test_a_body_that_starts_with_a_sent_range_writes_once_empty_first(
        sources: Tuple[pathlib.Path, pathlib.Path]) -> None:
    """uWSGI sends the response headers at the first write: one empty write comes before the first sent range."""
    first, second = sources
    wire: List[bytes] = []
    send_file = FakeSendFile(wire)
    pieces = [FileRange(first, 0, 2000), FileRange(second, 0, 770), FileRange(first, 2000, 1072)]
    body = response_body(pieces, 1000, send_file)
    assert next(body) == b''
    assert send_file.calls == []
    rest = drain(body, wire)
    assert rest == [second.read_bytes()]  # no empty write before the later ranges
    assert b''.join(wire) == first.read_bytes()[:2000] + second.read_bytes() + first.read_bytes()[2000:]


def test_socket_sendfile_waits_for_a_slow_client_and_sends_every_byte(tmp_path: pathlib.Path) -> None:
    import socket
    import threading
    data = os.urandom(3 << 20)
    path = tmp_path / 'data.bin'
    path.write_bytes(data)
    server, client = socket.socketpair()
    server.setblocking(False)  # as uWSGI's connection is
    received = bytearray()

    def read_slowly() -> None:
        while len(received) < len(data) - 100:
            chunk = client.recv(256 << 10)
            if not chunk:
                return
            received.extend(chunk)
            threading.Event().wait(0.002)

    reader = threading.Thread(target=read_slowly)
    reader.start()
    try:
        send = transport.socket_sendfile(server.fileno, timeout=10)
        with open(path, 'rb', buffering=0) as handle:
            position, remaining, calls = 100, len(data) - 100, 0
            while remaining:
                sent = send(handle, position, remaining)
                assert sent > 0
                position, remaining, calls = position + sent, remaining - sent, calls + 1
                assert calls < 100000
        reader.join(30)
        assert bytes(received) == data[100:]
    finally:
        server.close()
        client.close()
        reader.join(5)


def test_socket_sendfile_gives_up_on_a_client_that_takes_nothing(tmp_path: pathlib.Path) -> None:
    import socket
    path = tmp_path / 'data.bin'
    path.write_bytes(os.urandom(8 << 20))
    server, client = socket.socketpair()
    server.setblocking(False)
    try:
        send = transport.socket_sendfile(server.fileno, timeout=0.2)
        with open(path, 'rb', buffering=0) as handle, pytest.raises(TimeoutError):
            position = 0
            for _ in range(1000):  # fills the socket's buffers, then waits 0.2 s for nothing
                position += send(handle, position, (8 << 20) - position)
    finally:
        server.close()
        client.close()
