"""SeenKeys: a key never used is known on the event loop, with no database
trip; a key that may be stored (this process's or an earlier one's, written
yet or not) is still looked up, so a retry always finds its first call."""

from __future__ import annotations

import asyncio
import secrets

from rewardsignal.coordinator.store.db import Database, NewRequest
from rewardsignal.coordinator.store.seen_keys import SeenKeys, bitmap_of


def test_a_new_key_needs_no_lookup_and_every_stored_key_is_found_across_a_restart(tmp_path):
    async def go() -> None:
        db = Database(tmp_path / "signal.db")
        await db.open()
        await db.save_run("run-1", "alice", {"base_model": "signal-tiny"}, idem_key="make")
        await db.add_requests("alice", "run-1", [NewRequest("req-1", "forward", {}, None)],
                              idem_key="one", answer={"request_id": "req-1"})
        new = db.find_key_soon("alice", "never-used")
        assert new.done() and new.result() is None  # answered on the loop
        assert (await db.find_key("alice", "one"))["ref"] == "req-1"
        # Looked up while its write is still queued: the lookup waits behind it.
        writing = db.add_requests("alice", "run-1", [NewRequest("req-2", "forward", {}, None)],
                                  idem_key="two", answer={"request_id": "req-2"})
        lookup = db.find_key_soon("alice", "two")
        assert not lookup.done()
        await writing
        assert (await lookup)["answer"] == {"request_id": "req-2"}
        await db.close()

        again = Database(tmp_path / "signal.db")  # a restart
        unopened = again.find_key_soon("alice", "never-used")
        assert not unopened.done()  # nothing is known before the keys are read
        assert await unopened is None
        await again.open()
        assert (await again.find_key("alice", "make"))["ref"] == "run-1"
        assert (await again.find_key("alice", "one"))["ref"] == "req-1"
        assert (await again.find_key("alice", "two"))["ref"] == "req-2"
        for owner, key in (("alice", "three"), ("bob", "one")):  # keys are per owner
            fut = again.find_key_soon(owner, key)
            assert fut.done() and fut.result() is None
        await again.close()

    asyncio.run(go())


def test_the_filter_never_forgets_a_key_and_seldom_sends_a_new_one_to_the_database():
    def keys(n: int) -> list[tuple[str, str]]:
        return [(f"user-{i % 7}", secrets.token_hex(8)) for i in range(n)]

    stored, added, unseen = keys(25_000), keys(25_000), keys(50_000)
    seen = SeenKeys()
    assert all(seen.may_hold(o, k) for o, k in unseen[:100])  # not loaded: always "maybe"
    for owner, key in added:  # added before the stored keys are loaded: kept
        seen.add(owner, key)
    seen.load(bitmap_of(stored))
    assert all(seen.may_hold(o, k) for o, k in stored + added)
    maybes = sum(seen.may_hold(o, k) for o, k in unseen)
    # Two bits per key in 2**23: about 0.014% of new keys read "maybe" at 50,000 keys.
    assert maybes < 50, maybes
