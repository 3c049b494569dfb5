"""Delivering the outbox's completion events at least once: each due event claimed with a lease, sent, and
marked delivered on a 2xx or tried again later, the wait doubling, until give_up_after has passed."""
from __future__ import annotations

import datetime
import logging
import time
from typing import Callable, Optional

from . import database
from .config import Settings
from .errors import NotificationFailed
from .events import render
from .logcontext import about
from .orm import CartEvent, claim_event, drop_finished_events, due_events, event_delivered, event_failed, now
from .webhook import post_event

LOGGER = logging.getLogger(__name__)

DELIVERY_BATCH = 50  # events sent per pass at most
LEASE_MARGIN_S = 5.0  # a claimed event is left alone this long past the request's timeout
DROP_EVERY_S = 60.0  # how often a sender removes finished events (a scan of them: not every pass)

Sender = Callable[[str, bytes, str, float], int]


class EventDelivery:
    """Sends due events; several workers on several hosts may run one each (a lease keeps one on an event)."""

    def __init__(self, settings: Settings, send: Sender = post_event) -> None:
        """Send with `send` (url, body, content type, timeout), as `settings` say."""
        self.settings = settings
        self.send = send
        self._dropped_at: Optional[float] = None

    def retry_wait(self, attempts: int) -> float:
        """Seconds before the next try after `attempts` failed ones: doubling from retry_wait up to retry_wait_max."""
        settings = self.settings
        return min(settings.notifications_retry_wait * (2 ** min(max(attempts - 1, 0), 62)),
                   settings.notifications_retry_wait_max)

    def deliver_due(self) -> int:
        """Send the events that are due, one at a time; return how many were delivered.

        Each is claimed by compare-and-set, moving its next attempt past the send's timeout
        (the lease): a sender killed mid-send leaves it to come due again for another.
        Events delivered or given up are kept tombstone_time after their cart finished, then removed.
        """
        delivered = 0
        moment = now()
        if self._dropped_at is None or time.monotonic() - self._dropped_at >= DROP_EVERY_S:
            self._dropped_at = time.monotonic()
            with database.atomic():
                drop_finished_events(moment - datetime.timedelta(seconds=self.settings.tombstone_time))
        lease = datetime.timedelta(seconds=self.settings.notifications_timeout + LEASE_MARGIN_S)
        for event in due_events(moment, DELIVERY_BATCH):
            with database.atomic():
                claimed = claim_event(event, now() + lease)
            with about(cart_uid=str(event.subject), cart_id=int(event.cart_id)):
                if claimed and self._send_one(event):
                    delivered += 1
        return delivered

    def _send_one(self, event: CartEvent) -> bool:
        body, content_type = render(event, self.settings)
        attempts = int(event.attempts or 0) + 1
        try:
            self.send(str(event.target_url), body, content_type, self.settings.notifications_timeout)
        except NotificationFailed as exc:
            give_up = self.settings.notifications_give_up_after
            retry_at = now() + datetime.timedelta(seconds=self.retry_wait(attempts))
            age = (retry_at - event.created).total_seconds()
            if give_up and age > give_up:
                LOGGER.error('event %s (%s of %s) given up after %d attempts: %s', event.event_id, event.event_type,
                             event.subject, attempts, exc.message)
                with database.atomic():
                    event_failed(event.id, exc.message, None)
                return False
            LOGGER.warning('event %s (%s of %s), attempt %d: %s; next at %s', event.event_id, event.event_type,
                           event.subject, attempts, exc.message, retry_at)
            with database.atomic():
                event_failed(event.id, exc.message, retry_at)
            return False
        with database.atomic():
            event_delivered(event.id)
        LOGGER.info('event %s (%s of %s) delivered to %s', event.event_id, event.event_type, event.subject,
                    event.target_url)
        return True
