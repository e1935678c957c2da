"""Helpers for testing nimbus backends: the Store and Blobs contract suites."""

from __future__ import annotations

from nimbus.testing.store_contract import check_blobs, check_store

__all__ = ["check_blobs", "check_store"]
