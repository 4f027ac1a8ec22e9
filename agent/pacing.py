"""How much work the agent takes and how it chunks it, from how long each kind of job has taken here."""

from __future__ import annotations

from collections import OrderedDict
from typing import Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from .protocol import Task

BATCH_HORIZON_SECONDS = 0.1  # take enough work to keep the slots busy this long
CHUNK_SECONDS = 0.01  # tiny jobs travel to a pool worker in chunks of about this much work
MAX_TAKE = 4000  # the most jobs held here at once, however tiny
MAX_KINDS = 1000  # job kinds whose duration is remembered (the oldest learned is forgotten first)
SMOOTHING = 0.3  # weight of the newest batch in a kind's moving average


def kind_of(task: Task) -> str:
    """What the agent learns durations by: the callable's name, else the shell command."""
    return task.func or task.command or ""


class Pacing:
    """Moving averages of job durations per kind, and the decisions made from them.

    A kind never seen is assumed long (one per free slot, never chunked) until one of it finishes.
    Not thread-safe: the pool calls it under its own lock.
    """

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._estimates: "OrderedDict[str, float]" = OrderedDict()
        self._recent: Optional[str] = None  # the kind of the last task received

    def estimate(self, task: Task) -> Optional[float]:
        """Seconds a task of this kind took here on average, None if none has finished yet."""
        return self._estimates.get(kind_of(task))

    def learn(self, samples: Iterable[Tuple[str, float]]) -> None:
        """Fold (kind, seconds) samples in: each kind's mean over this batch moves its average."""
        batches: Dict[str, List[float]] = {}
        for kind, seconds in samples:
            batches.setdefault(kind, []).append(seconds)
        for kind, seconds_list in batches.items():
            mean = sum(seconds_list) / len(seconds_list)
            old = self._estimates.pop(kind, None)
            self._estimates[kind] = mean if old is None else (1 - SMOOTHING) * old + SMOOTHING * mean
            if len(self._estimates) > MAX_KINDS:
                self._estimates.popitem(last=False)

    def wanted(self, held: int) -> int:
        """Our credit on the master: enough jobs to keep every slot busy ~BATCH_HORIZON_SECONDS,
        judged by the kind received last (many of a tiny kind, only the free slots of a long or
        unknown one), less the `held` jobs already here."""
        estimate = self._estimates.get(self._recent) if self._recent is not None else None
        per_slot = 1 if estimate is None else max(1, int(BATCH_HORIZON_SECONDS / max(estimate, 1e-6)))
        return max(0, min(MAX_TAKE, self.slots * per_slot) - held)

    def admit(self, tasks: Sequence[Task], held: int, waiting: Iterable[Task]) -> Tuple[List[Task], List[Task]]:
        """Split tasks just received into (kept, handed back). A task is kept if a slot is free for
        it, or if it is short and the tasks `waiting` here hold under BATCH_HORIZON_SECONDS of work
        per slot; long or unknown jobs never wait behind a busy slot here: an idle agent takes them."""
        free = self.slots - held
        budget = BATCH_HORIZON_SECONDS * self.slots
        for task in waiting:
            budget -= self.estimate(task) or 0.0
        kept: List[Task] = []
        handed_back: List[Task] = []
        for task in tasks:
            self._recent = kind_of(task)
            estimate = self.estimate(task)
            short = estimate is not None and estimate < BATCH_HORIZON_SECONDS
            if free > 0 or (short and estimate is not None and budget >= estimate):
                free -= 1
                budget -= estimate or 0.0
                kept.append(task)
            else:
                handed_back.append(task)
        return kept, handed_back

    def next_chunk(self, waiting: Deque[Task], chunks_in_pool: int) -> Optional[List[Task]]:
        """Pop the next chunk for the pool off `waiting`, or None when it should wait: tiny tasks go
        many to a chunk (about CHUNK_SECONDS of work, one pool round trip), others one each; a chunk
        or two per slot in the pool at once, so a worker never waits for the agent."""
        if not waiting:
            return None
        head = waiting[0]
        estimate = self.estimate(head)
        tiny = estimate is not None and estimate < CHUNK_SECONDS
        if chunks_in_pool >= self.slots * (2 if tiny else 1):
            return None
        chunk = [waiting.popleft()]
        # A callable with a timeout runs alone, so a hard kill of its worker hits only it.
        if estimate is not None and tiny and not _alone(head):
            work = estimate
            while waiting and work < CHUNK_SECONDS:
                following = self.estimate(waiting[0])
                if following is None or _alone(waiting[0]):
                    break
                work += following
                chunk.append(waiting.popleft())
        return chunk


def _alone(task: Task) -> bool:
    """A callable with a timeout: past timeout + grace its worker is killed, so it shares no chunk."""
    return bool(task.func and task.timeout)
