"""The celery side without a broker: the tasks over a stub service, the reconciler thread, and the task queue.

The tasks are run in this process (`task.run` calls the body; `task.apply` runs it
eagerly through Celery's tracer, which needs the app's configuration but no broker).
`worker_service` is replaced by a stub that records what the use cases were asked; the
tasks open a connection on a temp SQLite file, as a worker does on its database.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from pacifica.cartd import celeryapp, database, tasks, wiring
from pacifica.cartd.celeryapp import BUNDLE_TASK, PUBLISH_RETRY, STAGE_TASK, CeleryTaskQueue
from pacifica.cartd.config import Settings, check_volume, load_settings

DEADLINE_S = 10.0


class StubService:
    """Records the use cases the tasks call and whether a database connection was open for each."""

    def __init__(self, on_tape: Optional[List[int]] = None) -> None:
        self.calls: List[Tuple[str, Tuple[Any, ...]]] = []
        self.connected: List[bool] = []
        self.on_tape = [] if on_tape is None else on_tape
        self.stage_error: Optional[Exception] = None

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        self.connected.append(not database.DB.is_closed())

    def stage_files(self, cart_id: int, file_ids: List[int], tape_round: int) -> List[int]:
        self._record('stage_files', cart_id, file_ids, tape_round)
        if self.stage_error is not None:
            raise self.stage_error
        return list(self.on_tape)

    def requeue_tape_files(self, cart_id: int, on_tape: List[int], tape_round: int) -> None:
        self._record('requeue_tape_files', cart_id, on_tape, tape_round)

    def bundle(self, cart_id: int) -> None:
        self._record('bundle', cart_id)


@pytest.fixture(autouse=True)
def settings(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings on a temp SQLite file (bound), read from a given environment only.

    They are also this process's settings, so Celery's configuration (task.apply and
    app.tasks read it) comes from them, not from ~/.pacifica-cartd or the environment.
    """
    loaded = load_settings(str(tmp_path / 'none.ini'), environ={
        'VOLUME_PATH': str(tmp_path / 'volume'), 'PEEWEE_URL': f'sqliteext:///{tmp_path}/db.sqlite3'})
    check_volume(loaded)
    database.bind(loaded)
    monkeypatch.setattr(wiring._PROCESS, 'settings', loaded)
    return loaded


@pytest.fixture
def stub(monkeypatch: pytest.MonkeyPatch) -> StubService:
    service = StubService(on_tape=[8, 9])
    monkeypatch.setattr(tasks, 'worker_service', lambda: service)
    return service


# ---- the tasks ------------------------------------------------------------------------

def test_task_names_and_delivery_options() -> None:
    assert tasks.stage_files.name == 'pacifica.cartd.tasks.stage_files' == STAGE_TASK
    assert tasks.bundle_cart.name == 'pacifica.cartd.tasks.bundle_cart' == BUNDLE_TASK
    # the tasks as the worker finds them, registered under the names the server sends
    for task in (tasks.stage_files, tasks.bundle_cart, celeryapp.app.tasks[STAGE_TASK],
                 celeryapp.app.tasks[BUNDLE_TASK]):
        assert task.acks_late is True
        assert task.reject_on_worker_lost is True
        assert task.ignore_result is True
    assert celeryapp.app.tasks[STAGE_TASK].run is tasks.stage_files.run
    assert celeryapp.app.tasks[BUNDLE_TASK].run is tasks.bundle_cart.run


def test_stage_files_stages_then_requeues_what_is_on_tape(stub: StubService) -> None:
    tasks.stage_files.run(7, [1, 2, 3], 2)
    assert stub.calls == [('stage_files', (7, [1, 2, 3], 2)), ('requeue_tape_files', (7, [8, 9], 2))]


def test_stage_files_runs_on_one_connection_and_gives_it_back(stub: StubService) -> None:
    assert database.DB.is_closed()
    tasks.stage_files.run(7, [1], 0)
    assert stub.connected == [True, True]
    assert database.DB.is_closed()


def test_stage_files_tape_round_defaults_to_0(stub: StubService) -> None:
    tasks.stage_files.run(7, [1])
    assert stub.calls == [('stage_files', (7, [1], 0)), ('requeue_tape_files', (7, [8, 9], 0))]


def test_stage_files_applied_eagerly_without_a_broker(stub: StubService) -> None:
    result = tasks.stage_files.apply(args=(7, [4, 5], 1), throw=True)
    assert result.successful()
    assert stub.calls == [('stage_files', (7, [4, 5], 1)), ('requeue_tape_files', (7, [8, 9], 1))]


def test_a_failed_stage_is_not_requeued_and_the_error_reaches_celery(stub: StubService) -> None:
    stub.stage_error = RuntimeError('database went away')
    with pytest.raises(RuntimeError, match='database went away'):
        tasks.stage_files.run(7, [1], 0)
    assert stub.calls == [('stage_files', (7, [1], 0))]
    assert database.DB.is_closed()  # given back on the way out too


def test_bundle_cart_bundles(stub: StubService) -> None:
    tasks.bundle_cart.run(11)
    assert stub.calls == [('bundle', (11,))]
    assert stub.connected == [True]
    result = tasks.bundle_cart.apply(args=(12,), throw=True)
    assert result.successful()
    assert stub.calls == [('bundle', (11,)), ('bundle', (12,))]


# ---- the reconciler -------------------------------------------------------------------

class ReconcileStub:
    """reconcile() raises on its first call, then counts; after `enough` calls it stops the loop."""

    def __init__(self, reconciler: tasks.Reconciler, enough: int) -> None:
        self.reconciler = reconciler
        self.enough = enough
        self.calls = 0
        self.sweeps = 0  # remove_expired calls: one after each reconcile that did not fail
        self.connected: List[bool] = []

    def reconcile(self) -> None:
        self.calls += 1
        self.connected.append(not database.DB.is_closed())
        if self.calls == 1:
            raise ConnectionError('broker unreachable')
        if self.calls >= self.enough:
            self.reconciler.stop.set()

    def remove_expired(self) -> int:
        self.sweeps += 1
        return 0


def run_loop(reconciler: tasks.Reconciler, interval: float) -> threading.Thread:
    thread = threading.Thread(target=reconciler._loop, args=(interval,), daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), 'the reconciler did not stop'
    return thread


def test_the_reconcile_loop_survives_a_failed_pass(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    reconciler = tasks.Reconciler()
    service = ReconcileStub(reconciler, enough=3)
    monkeypatch.setattr(tasks, 'worker_service', lambda: service)
    with caplog.at_level(logging.ERROR, logger='pacifica.cartd.tasks'):
        run_loop(reconciler, 0.001)
    assert service.calls == 3  # called again after the failure, until stopped
    assert service.sweeps == 2  # expired carts are looked for in every pass that got that far
    assert service.connected == [True, True, True]
    failures = [record for record in caplog.records if 'reconcile pass failed' in record.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None and isinstance(failures[0].exc_info[1], ConnectionError)
    assert database.DB.is_closed()


def test_a_stopped_reconciler_does_not_reconcile(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    reconciler = tasks.Reconciler()
    service = ReconcileStub(reconciler, enough=1)
    monkeypatch.setattr(tasks, 'worker_service', lambda: service)
    reconciler.stop.set()
    run_loop(reconciler, 0.001)
    assert service.calls == 0


def test_start_does_nothing_when_reconcile_interval_is_0(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, 'process_settings', lambda: dataclasses.replace(settings, reconcile_interval=0.0))
    monkeypatch.setattr(tasks, 'worker_service', lambda: pytest.fail('the reconciler ran'))
    reconciler = tasks.Reconciler()
    reconciler.start()
    assert reconciler.thread is None


def test_start_runs_one_thread_until_stopped(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, 'process_settings', lambda: dataclasses.replace(settings, reconcile_interval=3600.0))
    reconciler = tasks.Reconciler()
    service = ReconcileStub(reconciler, enough=1)
    monkeypatch.setattr(tasks, 'worker_service', lambda: service)
    reconciler.start()
    thread = reconciler.thread
    try:
        assert thread is not None and thread.is_alive() and thread.daemon
        assert thread.name == 'cartd-reconciler'
        reconciler.start()
        assert reconciler.thread is thread  # a second start starts nothing
    finally:
        reconciler.stop.set()
        if thread is not None:
            thread.join(DEADLINE_S)
    assert thread is not None and not thread.is_alive()
    assert service.calls == 0  # the first pass is due an interval after the start


def test_worker_signals_start_and_stop_the_reconciler(monkeypatch: pytest.MonkeyPatch) -> None:
    started: List[bool] = []
    reconciler = tasks.Reconciler()
    monkeypatch.setattr(reconciler, 'start', lambda: started.append(True))
    monkeypatch.setattr(tasks, 'RECONCILER', reconciler)
    tasks._start_reconciler(sender=None)
    assert started == [True]
    assert not reconciler.stop.is_set()
    tasks._stop_reconciler(sender=None)
    assert reconciler.stop.is_set()


# ---- CeleryTaskQueue ------------------------------------------------------------------

@dataclasses.dataclass
class Sent:
    id: str


class FakeControl:
    def __init__(self) -> None:
        self.revoked: List[Any] = []

    def revoke(self, task_ids: Any) -> None:
        self.revoked.append(task_ids)


class FakeCeleryApp:
    """Records send_task calls; each returns a result with a fresh id."""

    def __init__(self) -> None:
        self.sent: List[Tuple[str, Dict[str, Any]]] = []
        self.control = FakeControl()

    def send_task(self, name: str, **options: Any) -> Sent:
        self.sent.append((name, options))
        return Sent(f'id-{len(self.sent)}')


@pytest.fixture
def fake_app() -> Iterator[FakeCeleryApp]:
    yield FakeCeleryApp()


def test_enqueue_stage_sends_the_ids_now(fake_app: FakeCeleryApp) -> None:
    queue = CeleryTaskQueue(fake_app)  # type: ignore[arg-type]
    assert queue.enqueue_stage(3, (10, 11)) == 'id-1'
    [(name, options)] = fake_app.sent
    assert name == STAGE_TASK
    assert options['args'] == (3, [10, 11], 0)
    assert isinstance(options['args'][1], list)  # JSON-serialisable whatever sequence was given
    assert options['countdown'] is None  # 0 means now, not "in 0 seconds"
    assert options['ignore_result'] is True
    assert options['retry_policy'] == PUBLISH_RETRY


def test_enqueue_stage_later_passes_the_countdown_and_tape_round(fake_app: FakeCeleryApp) -> None:
    queue = CeleryTaskQueue(fake_app)  # type: ignore[arg-type]
    queue.enqueue_stage(3, [12], countdown=20, tape_round=2)
    [(name, options)] = fake_app.sent
    assert name == STAGE_TASK
    assert options['args'] == (3, [12], 2)
    assert options['countdown'] == 20
    assert options['ignore_result'] is True


def test_enqueue_bundle_sends_the_cart_id(fake_app: FakeCeleryApp) -> None:
    queue = CeleryTaskQueue(fake_app)  # type: ignore[arg-type]
    assert queue.enqueue_bundle(5) == 'id-1'
    [(name, options)] = fake_app.sent
    assert name == BUNDLE_TASK
    assert options['args'] == (5,)
    assert options['ignore_result'] is True


def test_revoke_passes_the_ids_as_a_list(fake_app: FakeCeleryApp) -> None:
    queue = CeleryTaskQueue(fake_app)  # type: ignore[arg-type]
    queue.revoke(('a', 'b'))
    assert fake_app.control.revoked == [['a', 'b']]


# ---- the notifier ---------------------------------------------------------------------

class DeliverStub:
    """deliver_events() counts its calls and stops the loop after the first."""

    def __init__(self, notifier: tasks.Notifier) -> None:
        self.notifier = notifier
        self.calls = 0

    def deliver_events(self) -> int:
        self.calls += 1
        self.notifier.stop.set()
        return 0


def test_the_notifier_runs_only_when_events_can_be_sent(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, 'process_settings', lambda: settings)
    monkeypatch.setattr(tasks, 'worker_service', lambda: pytest.fail('the notifier ran'))
    idle = tasks.Notifier()
    idle.start()
    assert idle.thread is None  # no [notifications]: no thread, no query

    configured = dataclasses.replace(settings, notifications_url='http://127.0.0.1:9/', notifications_interval=0.001)
    monkeypatch.setattr(tasks, 'process_settings', lambda: configured)
    notifier = tasks.Notifier()
    service = DeliverStub(notifier)
    monkeypatch.setattr(tasks, 'worker_service', lambda: service)
    notifier.start()
    assert notifier.thread is not None and notifier.thread.name == 'cartd-notifier'
    notifier.thread.join(DEADLINE_S)
    assert not notifier.thread.is_alive() and service.calls == 1
