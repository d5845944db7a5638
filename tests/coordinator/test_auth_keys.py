"""Stored keys are read on a thread only when ``signal keys`` changed them (its
stamp file) or ``RECHECK_S`` has passed: a change through the CLI holds from
the next request on, one made behind its back within ``RECHECK_S``."""

from __future__ import annotations

import sqlite3
import time

from apphelpers import Harness

from rewardsignal.coordinator.api import auth
from rewardsignal.coordinator.api.appkeys import AUTH
from rewardsignal.coordinator.store.keys import create_key, key_hash, revoke_key


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
