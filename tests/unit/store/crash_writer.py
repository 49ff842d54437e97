"""The child of the SIGKILL test: commits transitions as fast as it can, printing ``ACK n`` after each.

``python -m tests.unit.store.crash_writer PATH`` opens (or recovers) the store at PATH and goes on from
where the store says it was, with :data:`WRITERS` concurrent tasks. Transition ``n`` (from 1) is, by the
rule of :func:`transition`, either the fold of device ``dev-n`` into iteration ``n // PER_ITERATION + 1``
or, for a multiple of :data:`PER_ITERATION`, the end of an iteration (server state, model, reset sum).
Every running sum's bytes say which transition wrote it (:func:`blob`), so the parent can tell from the
store alone the last transition committed, and check that it is no earlier than the last one
acknowledged.
"""

from __future__ import annotations

import struct
import sys

import trio

from flcluster.store import (
    FoldedUpdates,
    NodeIdentity,
    PartialReset,
    ServerState,
    StoredModel,
    StoreRole,
    Transition,
    open_sqlite_store,
)

IDENTITY = NodeIdentity(StoreRole.SERVER, "crash-node", "Lenet", 1)
PER_ITERATION = 40
WRITERS = 8
BLOB = 64 * 1024


def blob(n: int) -> bytes:
    """The running sum written by transition ``n`` (its number, repeated)."""
    return struct.pack("<Q", n) * (BLOB // 8)


def written_by(data: bytes) -> int:
    """The number of the transition that wrote ``data``."""
    return int(struct.unpack_from("<Q", data)[0])


def iteration_of(n: int) -> int:
    """The iteration transition ``n`` belongs to (an iteration end opens the next one)."""
    return n // PER_ITERATION + 1


def transition(n: int) -> Transition:
    """Transition ``n``."""
    iteration = iteration_of(n)
    if n % PER_ITERATION == 0:
        return Transition(
            server=ServerState(0, iteration, "running", f'{{"n": {n}}}'),
            model=StoredModel(iteration - 1, blob(n)),
            keep_models=3,
            partial=PartialReset(iteration, blob(n)),
        )
    return Transition(partial=FoldedUpdates(iteration, (f"dev-{n}",), blob(n), n % PER_ITERATION))


async def main(path: str) -> None:
    async with open_sqlite_store(path, IDENTITY) as store:
        contents = await store.load()
        last = written_by(contents.partial.data) if contents.partial is not None else 0
        counter = iter(range(last + 1, sys.maxsize))

        async def writer() -> None:
            for n in counter:
                await store.commit(transition(n))  # made and queued with no checkpoint between
                sys.stdout.write(f"ACK {n}\n")
                sys.stdout.flush()

        async with trio.open_nursery() as nursery:
            for _ in range(WRITERS):
                nursery.start_soon(writer)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
