"""Name and clean up the RabbitMQ queues that test runs of the cart's celery worker use."""
from __future__ import annotations

import os
import socket
import uuid

BROKER_URL = 'pyamqp://guest:guest@127.0.0.1:5672//'
BROKER_ADDRESS = ('127.0.0.1', 5672)


def broker_available(timeout: float = 1.0) -> bool:
    """Tell whether RabbitMQ accepts TCP connections."""
    try:
        with socket.create_connection(BROKER_ADDRESS, timeout=timeout):
            return True
    except OSError:
        return False


def unique_queue_name() -> str:
    """Return a queue name no other worker, run or host shares."""
    return f'cartd-test-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}'


def delete_queue(name: str, url: str = BROKER_URL) -> None:
    """Delete a queue on the broker; a queue that does not exist is not an error."""
    from kombu.connection import Connection  # pylint: disable=import-outside-toplevel
    from amqp.exceptions import NotFound  # pylint: disable=import-outside-toplevel

    with Connection(url, connect_timeout=5) as conn:
        conn.ensure_connection(max_retries=2, interval_start=0.5, interval_step=0.5)
        channel = conn.channel()
        try:
            channel.queue_delete(name)
        except NotFound:
            pass
