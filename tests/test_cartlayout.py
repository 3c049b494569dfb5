"""cartlayout's hold on the garbage collector while tars are laid out (the layouts themselves: test_service)."""
from __future__ import annotations

import gc
import threading
from typing import Iterator

import pytest

from pacifica.cartd.cartlayout import collector_paused


@pytest.fixture
def collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_the_collector_is_off_while_layouts_are_made_and_on_after_the_last(collector_on: None) -> None:
    first_in, second_done = threading.Event(), threading.Event()
    seen = {}

    def second() -> None:
        first_in.wait(10)
        with collector_paused():
            seen['second'] = gc.isenabled()
        seen['after second'] = gc.isenabled()  # the first layout is still in progress
        second_done.set()

    thread = threading.Thread(target=second)
    thread.start()
    with collector_paused():
        seen['first'] = gc.isenabled()
        first_in.set()
        assert second_done.wait(10)
    thread.join(10)
    assert seen == {'first': False, 'second': False, 'after second': False}
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off(collector_on: None) -> None:
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()
    gc.enable()


def test_the_collector_comes_back_after_an_error(collector_on: None) -> None:
    with pytest.raises(RuntimeError):
        with collector_paused():
            raise RuntimeError('layout failed')
    assert gc.isenabled()
