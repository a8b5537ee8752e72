"""The writer lease on a run in a bucket, against a real S3 API (moto's server): one writer at a time,
a writer killed with SIGKILL frees the run once its lease expires, and a lease is only ever deleted or
taken over by the version its taker saw."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from actstore.store.errors import RunLocked
from actstore.store.lease import ObjectLease

WHAT = "run m/x"

HOLDER = """
import sys, time, s3fs
from actstore.store.lease import ObjectLease
ObjectLease(s3fs.S3FileSystem(), sys.argv[1], "run m/x", ttl=float(sys.argv[2]))
print("held", flush=True)
time.sleep(120)
"""

RACER = """
import sys, s3fs
from actstore.store.errors import RunLocked
from actstore.store.lease import ObjectLease
fs = s3fs.S3FileSystem()
fs.call_s3("head_bucket", Bucket=sys.argv[1].split("/")[0])  # connected before the start signal
print("ready", flush=True)
sys.stdin.readline()
try:
    ObjectLease(fs, sys.argv[1], "run m/x", ttl=60, margin=1)
    print("won", flush=True)
except RunLocked:
    print("refused", flush=True)
"""


@pytest.fixture
def fs(bucket):
    import s3fs

    return s3fs.S3FileSystem()


@pytest.fixture
def key(bucket) -> str:
    return bucket.removeprefix("s3://") + "/m/x/.writer-lease"


def etag(fs, key: str) -> str | None:
    """The lease object's ETag straight from the server (no s3fs cache), None if there is none."""
    bucket, path = key.split("/", 1)
    try:
        return fs.call_s3("head_object", Bucket=bucket, Key=path)["ETag"]
    except FileNotFoundError:
        return None


def delete(fs, key: str) -> None:
    """Delete the lease behind its holder's back, as an operator or a buggy writer might."""
    bucket, path = key.split("/", 1)
    fs.call_s3("delete_object", Bucket=bucket, Key=path)


def start(script: str, *args: str, stdin: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=stdin, stdout=subprocess.PIPE, text=True)


def killed_holder(key: str, ttl: float) -> tuple[int, float]:
    """A process that took the lease, killed with SIGKILL; its pid and the monotonic time it died."""
    holder = start(HOLDER, key, str(ttl))
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    return holder.pid, time.monotonic()


def test_a_second_writer_is_refused_until_the_first_releases(fs, key):
    first = ObjectLease(fs, key, WHAT, ttl=5)
    with pytest.raises(
        RunLocked,
        match=r"run m/x is being written by another process \(holder .* pid "
        rf"{os.getpid()}, lease until .* UTC\); wait for it to finish",
    ):
        ObjectLease(fs, key, WHAT, ttl=5)
    first.check()
    first.release()
    assert etag(fs, key) is None
    first.release()  # idempotent
    second = ObjectLease(fs, key, WHAT, ttl=5)
    second.check()
    second.release()
    assert etag(fs, key) is None


def test_a_writer_killed_with_sigkill_frees_the_run_when_its_lease_expires(fs, key, caplog):
    ttl = 1.0
    pid, died = killed_holder(key, ttl)
    with pytest.raises(RunLocked, match=f"pid {pid}"):
        ObjectLease(fs, key, WHAT, ttl=ttl, margin=1)
    while True:
        try:
            lease = ObjectLease(fs, key, WHAT, ttl=ttl, margin=1)
            break
        except RunLocked:
            assert time.monotonic() - died < 10, "the dead writer's lease never expired"
            time.sleep(0.2)
    assert time.monotonic() - died >= ttl
    assert "broke the expired writer lease of holder" in caplog.text and f"pid {pid}" in caplog.text
    lease.check()
    lease.release()


def test_renewal_keeps_a_live_writers_lease_beyond_its_ttl(fs, key):
    ttl, margin = 1.0, 1.0
    holder = ObjectLease(fs, key, WHAT, ttl=ttl)
    time.sleep(ttl + margin + 2)  # unrenewed, the lease would be expired by now
    with pytest.raises(RunLocked, match="being written by another process"):
        ObjectLease(fs, key, WHAT, ttl=ttl, margin=margin)
    holder.check()
    holder.release()


def test_check_refuses_once_another_writer_took_the_lease(fs, key):
    holder = ObjectLease(fs, key, WHAT, ttl=60)
    delete(fs, key)
    with pytest.raises(RunLocked, match=r"lost the writer lease \(it was broken and deleted\)"):
        holder.check()

    holder = ObjectLease(fs, key, WHAT, ttl=60)
    delete(fs, key)
    other = ObjectLease(fs, key, WHAT, ttl=60)
    with pytest.raises(RunLocked, match=r"lost the writer lease \(it was broken and taken by another process"):
        holder.check()
    with pytest.raises(RunLocked):  # still lost
        holder.check()
    other.check()
    other.release()


def test_renewal_notices_a_lost_lease(fs, key, caplog):
    holder = ObjectLease(fs, key, WHAT, ttl=0.6)
    delete(fs, key)
    ObjectLease(fs, key, WHAT, ttl=60)
    deadline = time.monotonic() + 5
    while "another process broke it" not in caplog.text:
        assert time.monotonic() < deadline, "the renewing thread did not notice that the lease was taken"
        time.sleep(0.1)
    assert any(r.levelno == logging.ERROR and "lost the writer lease" in r.getMessage() for r in caplog.records)
    with pytest.raises(RunLocked, match="another process broke it"):
        holder.check()


def test_release_leaves_a_lease_that_is_no_longer_ours(fs, key, caplog):
    holder = ObjectLease(fs, key, WHAT, ttl=60)
    delete(fs, key)
    other = ObjectLease(fs, key, WHAT, ttl=60)
    theirs = etag(fs, key)
    holder.release()
    assert etag(fs, key) == theirs
    assert "no longer ours; left in place" in caplog.text
    with pytest.raises(RunLocked):
        ObjectLease(fs, key, WHAT, ttl=60)
    other.release()
    assert etag(fs, key) is None


def test_of_writers_racing_to_break_a_stale_lease_exactly_one_wins(fs, key):
    _, died = killed_holder(key, ttl=1.0)
    racers = [start(RACER, key, stdin=subprocess.PIPE) for _ in range(3)]
    try:
        assert [r.stdout.readline().strip() for r in racers] == ["ready"] * 3
        time.sleep(max(0.0, died + 1.0 + 1.0 + 1.5 - time.monotonic()))  # ttl + margin + whole seconds
        for racer in racers:
            racer.stdin.write("go\n")
            racer.stdin.flush()
        results = sorted(r.stdout.readline().strip() for r in racers)
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
            racer.stdin.close()
            racer.stdout.close()
    assert results == ["refused", "refused", "won"]
    assert etag(fs, key) is not None


def test_a_break_deletes_only_the_version_its_breaker_judged_stale(fs, key):
    """The race above is over in milliseconds; this is its slow loser, step by step: a breaker that looked
    at the lease (``_head``) before another writer replaced it must not delete the replacement."""
    breaker = ObjectLease(fs, key, WHAT, ttl=60)
    seen = breaker._head()
    delete(fs, key)
    other = ObjectLease(fs, key, WHAT, ttl=60)
    theirs = etag(fs, key)
    assert not breaker._break(seen)
    assert etag(fs, key) == theirs
    other.check()
    other.release()
