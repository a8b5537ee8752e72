"""A server's memory stays bounded however many streams stop reading: each holds about one message, the
bytes held by all streams are budgeted, and a stream whose client reads nothing is ended after the idle
period. Real server in a subprocess, real stalled clients in another process, real sockets."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from actstore.client import Client
from actstore.server.errors import TooLarge
from actstore.server.gate import StreamBudget
from actstore.server.process import ServerProcess
from actstore.store import Store
from actstore.testing import write_synthetic_run
from actstore.v1 import actstore_pb2 as pb
from actstore.v1 import actstore_pb2_grpc as pb_grpc

RUN = ("synthetic", "stall")  # 4 layers x 2,000 samples x 576 float32: an 18 MB whole run
STALLED = 150

# A client process holding ``count`` streams of the whole run, each on its own connection (so that each
# is its own caller under open access) and each read for one message only; it prints "ready" once all
# are open and then never reads again. Its own flow-control windows are gRPC's defaults (BDP probing on).
STALLER = textwrap.dedent("""
    import sys, time, grpc
    from actstore.v1 import actstore_pb2 as pb, actstore_pb2_grpc as pb_grpc
    address, count, blosc = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    held = []
    for i in range(count):
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1), ("stall", i)])
        stream = pb_grpc.DataServiceStub(channel).ReadStates(pb.ReadStatesRequest(
            run=pb.RunRef(model="synthetic", method="stall"), accept_blosc=blosc), timeout=600)
        next(stream)
        held.append((channel, stream))
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("stall") / "store"
    write_synthetic_run(Store(root), *RUN, n_layers=4, n_samples=2000, hidden=576, batch=1000)
    return root


def stall(address: str, count: int, blosc: bool) -> subprocess.Popen:
    """The staller process, returned once its streams are all open."""
    process = subprocess.Popen(
        [sys.executable, "-c", STALLER, address, str(count), str(int(blosc))], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready", "the stalled client could not open its streams"
    return process


def stalled_stream(address: str, **options) -> tuple[grpc.Channel, object]:
    """One whole-run stream, read for one message, then left unread."""
    channel = grpc.insecure_channel(address, options=list(options.items()))
    stream = pb_grpc.DataServiceStub(channel).ReadStates(
        pb.ReadStatesRequest(run=pb.RunRef(model=RUN[0], method=RUN[1])), timeout=120
    )
    next(stream)
    return channel, stream


@pytest.mark.parametrize("blosc", [False, True], ids=["raw", "stored-chunks"])
def test_150_stalled_whole_run_streams_cost_bounded_memory_and_leave_the_server_to_others(store, tmp_path, blosc):
    """Before: each stalled stream held the shard-sized block it was cutting messages from (and gRPC its
    message), +1,178 MiB for 150 streams of this run; now about one ~0.5 MiB message and gRPC's copy."""
    with ServerProcess(store, tmp_path / "server.log") as server:
        with Client(server.address) as warm:  # caches and pools filled before the baseline
            warm.hidden_states(*RUN, layers=0)
        time.sleep(0.5)
        baseline = server.rss_bytes()
        staller = stall(server.address, STALLED, blosc)
        try:
            time.sleep(2)  # the server's streams all suspended on their writes
            grew = max(0, server.rss_bytes() - baseline)
            started = time.monotonic()
            with Client(server.address, timeout=5, stream_timeout=5, retries=0) as fresh:
                assert fresh.runs()[0]["method"] == RUN[1]
                assert fresh.hidden_states(*RUN, samples=[3]).sizes["layer"] == 4
                assert fresh.hidden_states(*RUN, layers=2).sizes["sample"] == 2000
            answered = time.monotonic() - started
            grew = max(grew, server.rss_bytes() - baseline)
        finally:
            staller.kill()
            staller.wait()
    print(
        f"{STALLED} stalled streams ({'stored chunks' if blosc else 'raw'}): server +{grew / 2**20:.0f} MiB, "
        f"a fresh caller answered in {answered:.2f} s"
    )  # the figures docs/benchmarks.md quotes (pytest -s)
    assert grew < 400 * 2**20, f"{STALLED} stalled streams grew the server by {grew / 2**20:.0f} MiB"
    assert answered < 3, f"a fresh caller waited {answered:.1f} s behind stalled streams"


def test_a_stream_whose_client_reads_nothing_is_ended_after_the_idle_period_and_its_place_given_back(store, tmp_path):
    with ServerProcess(
        store, tmp_path / "idle.log", "--stream-idle-timeout", "2", "--max-streams-per-caller", "1"
    ) as server:
        channel, stream = stalled_stream(server.address, **{"grpc.http2.bdp_probe": 0})
        with channel:
            time.sleep(3.5)  # past the idle period: the server ends the stream
            with pytest.raises(grpc.RpcError) as ended:
                for _ in stream:  # what was already on its way, then the status
                    pass
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "read none of this stream for 2 s" in ended.value.details()
            again = pb_grpc.DataServiceStub(channel).ReadStates(  # the caller's only stream place is back
                pb.ReadStatesRequest(run=pb.RunRef(model=RUN[0], method=RUN[1]), layers=[0]), timeout=30
            )
            assert sum(len(m.chunk.data) for m in again) == 2000 * 576 * 4
        assert "ReadStates group=open status=DEADLINE_EXCEEDED" in server.output()


def test_past_the_byte_budget_a_new_stream_waits_for_room(store, tmp_path):
    """Two stalled streams hold the 1.5 MiB budget (about 0.6 MiB each); a third is served only once the
    idle period has ended them and given their bytes back."""
    with ServerProcess(
        store, tmp_path / "budget.log", "--max-inflight-mb", "1.5", "--stream-idle-timeout", "3"
    ) as server:
        held = [stalled_stream(server.address, **{"grpc.http2.bdp_probe": 0, "n": i}) for i in range(2)]
        try:
            time.sleep(0.5)
            started = time.monotonic()
            with Client(server.address, timeout=10, stream_timeout=10, retries=0) as third:
                assert third.hidden_states(*RUN, layers=1).sizes["sample"] == 2000
            waited = time.monotonic() - started
        finally:
            for channel, stream in held:
                stream.cancel()
                channel.close()
    assert 1.5 < waited < 6, f"the third stream waited {waited:.1f} s"


def test_the_byte_budget_lets_one_large_message_through_alone_and_refuses_after_the_idle_period():
    async def scenario() -> None:
        budget = StreamBudget(1, max_bytes=100, idle_s=0.3)
        async with budget.reserve(150):  # larger than the whole budget, but alone
            assert budget.bytes_in_flight == 150
        async with budget.reserve(80):
            started = asyncio.get_running_loop().time()
            with pytest.raises(TooLarge, match="MiB: retry later"):
                async with budget.reserve(50):
                    pass
            assert asyncio.get_running_loop().time() - started >= 0.3
            waiting = asyncio.ensure_future(_reserve_and_report(budget, 50))
            await asyncio.sleep(0.05)
            assert not waiting.done()  # waits for room...
        assert await waiting == 50  # ...and gets it once the first reservation ends
        assert budget.bytes_in_flight == 0

    asyncio.run(scenario())


async def _reserve_and_report(budget: StreamBudget, nbytes: int) -> int:
    async with budget.reserve(nbytes):
        return budget.bytes_in_flight
