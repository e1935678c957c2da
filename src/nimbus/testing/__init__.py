"""Helpers for testing nimbus backends: the Store, Blobs and Queue contract suites."""

from __future__ import annotations

from nimbus.testing.queue_contract import check_queue, check_queue_realtime, check_queue_shared
from nimbus.testing.store_contract import check_blobs, check_store

__all__ = ["check_blobs", "check_queue", "check_queue_realtime", "check_queue_shared",
           "check_store"]
