"""Stored keys are read on a thread only when ``signal keys`` changed them (its
stamp file) or ``RECHECK_S`` has passed: a change through the CLI holds from
the next request on, one made behind its back within ``RECHECK_S``."""

from __future__ import annotations

import os
import sqlite3
import time

from apphelpers import Harness

from rewardsignal.coordinator.api import auth
from rewardsignal.coordinator.api.appkeys import AUTH
from rewardsignal.coordinator.store.keys import (
    KeyStore,
    create_key,
    key_hash,
    list_keys,
    revoke_key,
    stamp_path,
)


def test_keys_are_read_again_only_when_changed_or_stale(tmp_path, monkeypatch):
    db = tmp_path / "data" / "signal.db"
    create_key(db, "carol", "user", key_hash("sk-carol"))
    create_key(db, "erin", "user", key_hash("sk-erin"))  # stays: keys stay switched on
    h = Harness(tmp_path / "data")
    try:
        store = h.app[AUTH]._stored
        reads = []
        real = store.current
        monkeypatch.setattr(store, "current", lambda: reads.append(1) or real())
        monkeypatch.setattr(auth, "RECHECK_S", 3600.0)
        carol = {"Authorization": "Bearer sk-carol"}
        for _ in range(5):
            h.request("GET", "/v1/runs", headers=carol, expect=200)
        assert len(reads) == 1  # fresh: no thread hop for the other four

        create_key(db, "dave", "user", key_hash("sk-dave"))  # through the CLI's code
        h.request("GET", "/v1/runs", headers={"Authorization": "Bearer sk-dave"}, expect=200)
        assert len(reads) == 2
        assert revoke_key(db, "carol")
        code, body = h.request("GET", "/v1/runs", headers=carol)
        assert code == 401 and "revoked" in body["error"]["message"]
        assert len(reads) == 3

        # Revoked behind the CLI's back (no stamp): refused once RECHECK_S has passed.
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE keys SET revoked = 1 WHERE name = 'dave'")
        dave = {"Authorization": "Bearer sk-dave"}
        h.request("GET", "/v1/runs", headers=dave, expect=200)  # still trusted
        monkeypatch.setattr(auth, "RECHECK_S", 0.2)
        time.sleep(0.25)
        code, _ = h.request("GET", "/v1/runs", headers=dave)
        assert code == 401
    finally:
        h.close()


def test_every_change_moves_the_stamp_whatever_the_clock(tmp_path):
    """Each change appends to the stamp: two in one clock tick (modification
    times forced equal here, as a coarse clock gives them) still differ."""
    db = tmp_path / "signal.db"
    store = KeyStore(db)
    assert store.stamp() is None
    create_key(db, "a", "user", key_hash("sk-a"))
    seen = store.stamp()
    mtime = stamp_path(db).stat().st_mtime_ns
    # Two more changes (a stamp replaced by a new file could even get its old
    # inode back by the second), in the same tick as the one seen.
    create_key(db, "b", "user", key_hash("sk-b"))
    assert revoke_key(db, "a")
    os.utime(stamp_path(db), ns=(mtime, mtime))
    assert store.stamp() != seen


def test_a_stamp_that_cannot_be_written_does_not_undo_the_change(tmp_path, caplog):
    db = tmp_path / "data" / "signal.db"
    create_key(db, "erin", "user", key_hash("sk-erin"))
    stamp_path(db).unlink()
    stamp_path(db).mkdir()  # cannot be opened for writing
    create_key(db, "frank", "user", key_hash("sk-frank"))  # no exception: it is stored
    assert "within a second" in caplog.text
    assert [k["name"] for k in list_keys(db)] == ["erin", "frank"]


def test_revoking_the_last_key_locks_the_door_instead_of_opening_it(tmp_path):
    db = tmp_path / "data" / "signal.db"
    create_key(db, "carol", "user", key_hash("sk-carol"))
    create_key(db, "fleet", "worker", key_hash("wt-fleet"))
    h = Harness(tmp_path / "data")
    try:
        h.request("GET", "/v1/runs", headers={"Authorization": "Bearer sk-carol"}, expect=200)
        assert revoke_key(db, "carol") and revoke_key(db, "fleet")
        for headers in ({"Authorization": "Bearer sk-carol"}, {}):
            code, _ = h.request("GET", "/v1/runs", headers=headers)
            assert code == 401
        for headers in ({"Authorization": "Bearer wt-fleet"}, {}):
            code, _ = h.request("POST", "/v1/workers/register", headers=headers,
                                json={"name": "w", "device": "cpu"})
            assert code == 401
    finally:
        h.close()
