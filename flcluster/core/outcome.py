"""What one event did to a state machine: the one result type of every machine in :mod:`flcluster.core`.

Theory of operation
-------------------
Every sans-IO machine here has the same shape (spec/state-machines.md): the driver feeds it one event
with ``handle(event)`` and gets back an :class:`Outcome`, the reply to send to whoever sent the event
(None when the event was not a request, or needs no answer) and the instructions to carry out, in order.
The machines differ only in their reply and instruction types, so the outcome is generic in both:
:mod:`flcluster.core.cluster` returns ``Outcome[cluster.Reply, cluster.Instruction]`` and
:mod:`flcluster.core.iteration` ``Outcome[iteration.Reply, iteration.Instruction]``. A driver reads
both alike: answer the sender with ``reply``, then dispatch each of ``instructions`` with ``match`` and
``assert_never``.

An outcome is a frozen record, so tests compare it whole (``machine.handle(e) == Outcome(reply, (...))``).
"""

from __future__ import annotations

from typing import Generic, TypeVar, final

import attrs

__all__ = ["InstructionT", "Outcome", "ReplyT"]

#: The reply type of one machine (a union of frozen records).
ReplyT = TypeVar("ReplyT")
#: The instruction type of one machine (a union of frozen records).
InstructionT = TypeVar("InstructionT")


@final
@attrs.frozen
class Outcome(Generic[ReplyT, InstructionT]):
    """What one event produced: the reply to its sender and the instructions to carry out, in order.

    Attributes:
        reply: The answer to the event's sender; None for an event that is not a request.
        instructions: What the driver must do, in this order; empty when the event changed nothing.
    """

    reply: ReplyT | None = None
    instructions: tuple[InstructionT, ...] = ()
