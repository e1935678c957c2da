"""Ids: valid version-4 UUIDs, unique, and never shared with a forked child."""

from __future__ import annotations

import os
import uuid

from nimbus.ids import new_id


def test_ids_are_version_4_uuids_and_unique() -> None:
    ids = [new_id() for _ in range(5000)]  # crosses several 256-id refills
    assert len(set(ids)) == len(ids)
    for i in ids[:600]:
        u = uuid.UUID(i)
        assert (u.version, u.variant, str(u)) == (4, uuid.RFC_4122, i)


def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    new_id()  # the buffer is part-used when we fork
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report the next ids and leave at once
        os.close(r)
        os.write(w, " ".join(new_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        child = set(f.read().split())
    os.waitpid(pid, 0)
    parent = {new_id() for _ in range(10)}
    assert len(child) == 10 and not child & parent
