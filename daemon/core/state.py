"""Per-sequence recurrent state, one per (input partition, sequence id).

Knows nothing of Kafka or TensorFlow: a state is NumPy arrays plus the
bookkeeping that makes redelivery harmless (the watermark), and a snapshot
format (`snapshot` / `restore`) that checkpointing writes to the state topic.
"""

from __future__ import annotations

import math
import struct
import time
from collections import OrderedDict
from collections.abc import Container, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import orjson

StateTensors = list[np.ndarray]

# Offsets start at 0; -1 means "nothing applied yet".
NO_OFFSET = -1

# Snapshot layout: magic, u32 header length, JSON header, float32 tensors (little
# endian) back to back. The magic carries a version so a future layout can be read
# next to this one.
SNAPSHOT_MAGIC = b"LSTMD1"
# Header versions: 1 (no "v"), 2 adds "used". Readers ignore keys they do not know, so a
# daemon of either version reads the other's records.
SNAPSHOT_VERSION = 2
_HEADER_LEN = struct.Struct("<I")


_NO_STATES: Mapping[str, SequenceState] = {}

#: The model id of a state record that could not be read (see `SequenceState.unreadable`).
UNREADABLE = "unreadable"


def same_model(a: str, b: str) -> bool:
    """Whether two model ids name the same model: the same file content.

    A model id is `<file stem>@<SHA-256 prefix>` (the `model` field of outputs);
    the stem is only a label, so a renamed file is the same model and its saved
    states still apply. An id without "@" is compared whole.
    """
    if "@" not in a or "@" not in b:
        return a == b
    return model_tag(a) == model_tag(b)


# The state topic also holds the states of models that follow a partition without
# serving it (a shadow, a candidate being promoted), under keys no sequence id can
# have: 0xFF and 0xFE never occur in UTF-8. A serving state's key is its sequence id.
OTHER_MODEL_KEY = b"\xff"  # + model tag + 0x00 + sequence id: that model's state
FOLLOWING_KEY = b"\xfe"  # + model tag: that model's states of the partition are exact


def model_tag(model_id: str) -> str:
    """The part of a model id that names its content (see `same_model`)."""
    return model_id.rpartition("@")[2]


class StateKey(NamedTuple):
    """A state record's key, read: whose it is (None: the serving model's) and of what."""

    owner: str | None  # a model tag, or None
    key: str  # the sequence id ("" for a following marker)
    following: bool = False  # the marker: `owner`'s states of the partition are exact


def state_key(key: str, owner: str | None = None, *, following: bool = False) -> bytes:
    """The state topic's record key of a sequence's state (`owner`: the tag of a model
    that follows the partition without serving it), or of `owner`'s following marker."""
    if owner is None:
        return key.encode()
    if following:
        return FOLLOWING_KEY + owner.encode()
    return OTHER_MODEL_KEY + owner.encode() + b"\x00" + key.encode()


def parse_state_key(raw: bytes | None) -> StateKey:
    """Inverse of `state_key`; an undecodable key reads as a sequence id with
    replacement characters, as it always did."""
    raw = raw or b""
    if raw.startswith(FOLLOWING_KEY):
        return StateKey(raw[1:].decode("utf-8", "replace"), "", following=True)
    if raw.startswith(OTHER_MODEL_KEY):
        tag, _, key = raw[1:].partition(b"\x00")
        return StateKey(tag.decode("utf-8", "replace"), key.decode("utf-8", "replace"))
    return StateKey(None, raw.decode("utf-8", "replace"))


class SnapshotError(ValueError):
    """A state record that is not an lstmd snapshot (or of an unknown version)."""


@dataclass(slots=True, eq=False)
class SequenceState:
    """One sequence's recurrent state and where in the input it stands.

    `tensors` is None for a fresh or reset state (zeros): the engine fills it.
    `watermark` is the offset of the last input this state includes; an input
    at or below it is never applied again. `first_offset` is the offset of the
    sequence's first input since its last reset, so an open sequence can be
    rebuilt by replaying from there. `last_step` is the `step` of the last input
    planned for it; the processor keeps it, so `reset` leaves it alone.
    `exact` is False for a state that did not see its sequence from its first input
    (a model that joined while it was open and could not replay it): its steps
    publish nothing until its next reset.
    """

    tensors: StateTensors | None = None
    n: int = 0
    watermark: int = NO_OFFSET
    first_offset: int = NO_OFFSET
    last_step: int | None = None
    last_seen: float = field(default_factory=time.monotonic)
    exact: bool = True

    def reset(self) -> None:
        self.tensors = None
        self.n = 0
        self.first_offset = NO_OFFSET
        self.exact = True

    def snapshot(self, model_id: str, used: float | None = None) -> bytes:
        """The state as a state-topic record value. A reset state is a reset record:
        no tensors, but the watermark, so a redelivered input is still recognised.
        `used` overrides when it was last used (for `snapshot_bytes`)."""
        tensors = self.tensors if self.n else None
        if used is None:
            used = round(time.time() - (time.monotonic() - self.last_seen), 3)
        header = orjson.dumps(
            {
                "model": model_id,
                "wm": self.watermark,
                "first": self.first_offset,
                "n": self.n,
                "step": self.last_step,
                "reset": tensors is None,
                "shapes": [list(t.shape) for t in tensors] if tensors is not None else [],
                # Version 2: when the sequence was last used (wall clock), so its idle
                # clock and its place in the eviction order survive a restore.
                "v": SNAPSHOT_VERSION,
                "used": used,
                **({} if self.exact else {"exact": False}),
            }
        )
        body = b"".join(np.ascontiguousarray(t, dtype="<f4").tobytes() for t in tensors or ())
        return SNAPSHOT_MAGIC + _HEADER_LEN.pack(len(header)) + header + body

    @classmethod
    def unreadable(cls, raw: bytes, previous: SequenceState | None) -> SequenceState:
        """What is left of a record `from_snapshot` refused: its watermark, steps and last
        step if its header reads (the tensors are what is lost), else those of the
        key's previous record, a lower bound. Installed as a reset state, announced."""
        header = _header(raw)
        try:
            if header is not None:
                return cls(n=int(header["n"]), watermark=int(header["wm"]), last_step=header.get("step"))
        except (KeyError, TypeError, ValueError):
            pass
        if previous is not None:
            return cls(n=previous.n, watermark=previous.watermark, last_step=previous.last_step)
        return cls()

    @classmethod
    def from_snapshot(cls, raw: bytes, restored_at: float | None = None) -> SavedState:
        """Inverse of `snapshot`: the state and the identity of the model it belongs to.

        A version-1 record does not say when it was last used: it counts as used at
        `restored_at` (a monotonic time, by default now); give every record of one
        restore the same, so the watermark orders them.
        """
        if not raw.startswith(SNAPSHOT_MAGIC):
            raise SnapshotError("not an lstmd state snapshot (bad magic)")
        at = len(SNAPSHOT_MAGIC)
        try:
            (size,) = _HEADER_LEN.unpack_from(raw, at)
            header = orjson.loads(raw[at + _HEADER_LEN.size : at + _HEADER_LEN.size + size])
            body = memoryview(raw)[at + _HEADER_LEN.size + size :]
            tensors: StateTensors = []
            pos = 0
            for shape in header["shapes"]:
                count = math.prod(shape)  # not np.prod: a quarter of a restore's time
                arr = np.frombuffer(body[pos : pos + 4 * count], dtype="<f4").reshape(shape)
                tensors.append(arr.astype(np.float32))
                pos += 4 * count
            if pos != len(body):
                raise SnapshotError("state snapshot has trailing bytes")
            state = cls(
                tensors=None if header["reset"] else tensors,
                n=int(header["n"]),
                watermark=int(header["wm"]),
                first_offset=int(header["first"]),
                last_step=header["step"],
                exact=bool(header.get("exact", True)),
            )
            used = header.get("used")  # absent in version 1
            if used is not None:
                state.last_seen = time.monotonic() - max(0.0, time.time() - float(used))
            elif restored_at is not None:
                state.last_seen = restored_at
            return SavedState(state, str(header["model"]))
        except (struct.error, orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"corrupt state snapshot: {exc}") from None


class SavedState(NamedTuple):
    """A state as a snapshot holds it: the state and the model it was saved under
    (restore installs it only for the same model; rebuild recomputes it otherwise)."""

    state: SequenceState
    model_id: str


def snapshot_bytes(model_id: str, shapes: Sequence[tuple[int, ...]]) -> int:
    """The largest state record value of a model: its tensors' floats and a header
    whose numbers take their widest (offsets, steps and step counts of 19 digits, the
    last use a wall-clock time of 10 digits and 3 decimals): the same whenever and
    wherever it is computed, unlike a real record's."""
    widest = 10**18
    state = SequenceState(
        tensors=[np.zeros(shape, np.float32) for shape in shapes],
        n=widest,
        watermark=widest,
        first_offset=widest,
        last_step=-widest,
    )
    return len(state.snapshot(model_id, used=9_999_999_999.999))


def _header(raw: bytes) -> dict[str, Any] | None:
    """A snapshot's JSON header, or None if there is none to read."""
    if not raw.startswith(SNAPSHOT_MAGIC):
        return None
    at = len(SNAPSHOT_MAGIC)
    try:
        (size,) = _HEADER_LEN.unpack_from(raw, at)
        header = orjson.loads(raw[at + _HEADER_LEN.size : at + _HEADER_LEN.size + size])
    except (struct.error, orjson.JSONDecodeError):
        return None
    return header if isinstance(header, dict) else None


@dataclass(slots=True)
class Eviction:
    """A state dropped from memory before its sequence ended; always announced."""

    partition: int
    key: str
    cause: str  # one of EVICTION_CAUSES (daemon/ops/metrics.py)
    n: int
    watermark: int


class StateStore:
    """All sequence states of the partitions this process owns.

    It remembers which states changed since the last checkpoint (`take_changes`),
    keeps the watermark of sequences that ended until that reset is committed,
    and evicts idle or least recently used states. A partition's high watermark
    (the last offset processed in it) guards against a seek or retry within
    this process.

    Memory: at most `max_sequences` states (0: unbounded), plus what is remembered
    of sequences that hold none (`ended`), which `max_ended` bounds.
    """

    def __init__(self, max_sequences: int = 0, max_ended: int | None = None) -> None:
        """`max_ended`: how many evicted sequences' last steps are remembered, at most
        (None: all, for stores that never commit: replay, rebuild, benchmarks).

        Why a count and not a time: it is a memory bound whatever the traffic (a
        burst of capacity evictions cannot outgrow it), and it bounds what a restore
        reads back too. What is given up past it is the `step` duplicate check of the
        oldest evicted sequences: a retried step of one of them is applied as the
        first step of a new sequence (n = 1, from zeros) instead of being dropped,
        and a step gap after it is not counted. The watermark's protection is never
        given up: a sequence is forgotten only once its watermark is below its
        partition's committed offset, where Kafka never delivers again.
        """
        self.max_sequences = max_sequences  # 0: unbounded
        self.max_ended = max_ended
        self._states: dict[int, OrderedDict[str, SequenceState]] = {}
        # Sequences that hold no state: key -> (watermark, last step) of its reset. An
        # ended sequence's last step is None; an evicted one keeps it, so a retried
        # step after the eviction is still recognised.
        self._ended: dict[int, dict[str, tuple[int, int | None]]] = {}
        # The evicted ones (a last step kept), oldest first: `max_ended` forgets those.
        self._stepped: OrderedDict[tuple[int, str], None] = OrderedDict()
        # Each partition's committed offset, as far as known (`committed`).
        self._committed: dict[int, int] = {}
        # Forgotten sequences whose record the next checkpoint deletes (a tombstone).
        self._forgotten: dict[int, set[str]] = {}
        self._high: dict[int, int] = {}
        self._dirty: dict[int, set[str]] = {}
        self._count = 0

    # -- lookup -----------------------------------------------------------------
    def get(self, partition: int, key: str) -> SequenceState:
        states = self._states.setdefault(partition, OrderedDict())
        state = states.get(key)
        if state is None:
            state = states[key] = SequenceState()
            ended = self._ended.get(partition, {}).pop(key, None)
            if ended is not None:
                state.watermark, state.last_step = ended
                self._stepped.pop((partition, key), None)
            self._count += 1
        else:
            states.move_to_end(key)
        state.last_seen = time.monotonic()
        return state

    def peek(self, partition: int, key: str) -> SequenceState | None:
        """The key's live state, if it has one; unlike `get`, creates nothing."""
        return self._live(partition).get(key)

    def watermark(self, partition: int, key: str) -> int:
        """The last offset applied to this key's state (live or ended), or NO_OFFSET."""
        state = self._live(partition).get(key)
        if state is not None:
            return state.watermark
        ended = self._ended.get(partition, {}).get(key)
        return NO_OFFSET if ended is None else ended[0]

    def processed_to(self, partition: int) -> int:
        return self._high.get(partition, NO_OFFSET)

    def advance(self, partition: int, offset: int) -> None:
        if offset > self._high.get(partition, NO_OFFSET):
            self._high[partition] = offset

    def _live(self, partition: int) -> Mapping[str, SequenceState]:
        return self._states.get(partition) or _NO_STATES

    # -- changes ----------------------------------------------------------------
    def mark_changed(self, partition: int, key: str) -> None:
        """A state changed: its next checkpoint must carry it."""
        self._dirty.setdefault(partition, set()).add(key)

    def end(self, partition: int, key: str) -> None:
        """The sequence reset and holds nothing: free its memory, keep its watermark."""
        state = self._states[partition].pop(key, None) if partition in self._states else None
        if state is not None:
            self._count -= 1
            self._remember(partition, key, state)
            self.mark_changed(partition, key)

    def _remember(self, partition: int, key: str, state: SequenceState) -> None:
        """What is kept of a sequence that holds no state: its watermark and last step."""
        self._ended.setdefault(partition, {})[key] = (state.watermark, state.last_step)
        self._forgotten.get(partition, set()).discard(key)
        if state.last_step is None:
            self._stepped.pop((partition, key), None)
        else:
            self._stepped[(partition, key)] = None
            self._stepped.move_to_end((partition, key))

    def forget_if_empty(self, partition: int, key: str) -> None:
        """Undo a `get` that changed nothing: an empty state goes back to its watermark
        and last step, without a record to write."""
        states = self._states.get(partition)
        state = states.get(key) if states else None
        empty = state is not None and state.n == 0 and state.tensors is None and state.exact
        if states is not None and state is not None and empty:
            del states[key]
            self._count -= 1
            self._remember(partition, key, state)

    def mark_partition(self, partition: int) -> None:
        """Every state of the partition (live or ended) must be written by the next
        checkpoint: it is written under a new identity (a model joined or promoted)."""
        self._dirty.setdefault(partition, set()).update(self.keys(partition))

    def keys(self, partition: int) -> set[str]:
        """The sequences of the partition it holds something of: a state or a watermark."""
        return set(self._live(partition)) | set(self._ended.get(partition, {}))

    def replace_with(self, other: StateStore) -> None:
        """Take `other`'s states and bookkeeping as this store's own (a promoted model's
        store becomes the serving one, in place: every part of the run that holds this
        store sees the new states)."""
        self.__dict__.update(other.__dict__)

    def has_changes(self) -> bool:
        return any(self._dirty.values())

    def take_changes(
        self, model_id: str, only: Container[int] | None = None
    ) -> list[tuple[int, str, bytes | None]]:
        """(partition, key, snapshot) of every state changed since the last call;
        ended sequences give reset records, forgotten ones None (a tombstone).
        `only`: of these partitions; the others' changes are dropped (a model still
        building them writes each of their states once it has, `mark_partition`)."""
        out: list[tuple[int, str, bytes | None]] = []
        for partition, keys in self._dirty.items():
            if only is not None and partition not in only:
                self._forgotten.pop(partition, None)
                continue
            states = self._live(partition)
            ended = self._ended.get(partition, {})
            forgotten = self._forgotten.pop(partition, set())
            for key in keys:
                state = states.get(key)
                if state is None:
                    if key in forgotten and key not in ended:
                        out.append((partition, key, None))
                        continue
                    watermark, last_step = ended.get(key, (NO_OFFSET, None))
                    state = SequenceState(watermark=watermark, last_step=last_step)
                out.append((partition, key, state.snapshot(model_id)))
        self._dirty.clear()
        return out

    def forget_ended_before(self, partition: int, offset: int) -> list[str]:
        """Offsets below `offset` are committed: ended sequences at or below it no
        longer need their watermark. Returns the keys whose records may now be
        tombstoned. An evicted sequence keeps its reset record: it holds the last
        step, and a retried step may come after the commit; past `max_ended` the
        oldest are forgotten (`forget_ended`)."""
        self._committed[partition] = max(offset, self._committed.get(partition, NO_OFFSET))
        ended = self._ended.get(partition, {})
        done = [k for k, (wm, step) in ended.items() if wm < offset and step is None]
        for key in done:
            del ended[key]
        self.forget_ended()
        return done

    def forget_ended(self) -> None:
        """Forget the evicted sequences past `max_ended`, oldest evicted first: their
        last steps go, and their records are deleted by the next checkpoint (a
        tombstone each). One whose watermark its partition has not committed yet
        waits: forgetting it could let a redelivered input through."""
        excess = len(self._stepped) - self.max_ended if self.max_ended is not None else 0
        if excess <= 0:
            return
        forget: list[tuple[int, str]] = []
        for partition, key in self._stepped:
            if len(forget) == excess:
                break
            if self._ended[partition][key][0] < self._committed.get(partition, NO_OFFSET):
                forget.append((partition, key))
        for partition, key in forget:
            del self._stepped[(partition, key)]
            del self._ended[partition][key]
            self._forgotten.setdefault(partition, set()).add(key)
            self.mark_changed(partition, key)

    def ended(self) -> int:
        """How many sequences that hold no state are remembered (watermark, last step)."""
        return sum(len(keys) for keys in self._ended.values())

    # -- eviction ---------------------------------------------------------------
    def evict_idle(self, idle_s: float, now: float | None = None) -> list[Eviction]:
        now = time.monotonic() if now is None else now
        out: list[Eviction] = []
        for partition, states in self._states.items():
            for key in [k for k, s in states.items() if now - s.last_seen > idle_s]:
                out.append(self._evict(partition, key, "idle"))
        return out

    def evict_over_capacity(self) -> list[Eviction]:
        """Least recently used first, across partitions, until within max_sequences."""
        out: list[Eviction] = []
        while self.max_sequences and self._count > self.max_sequences:
            partition, key = min(
                ((p, next(iter(s))) for p, s in self._states.items() if s),
                key=lambda pk: self._states[pk[0]][pk[1]].last_seen,
            )
            out.append(self._evict(partition, key, "capacity"))
        return out

    def _evict(self, partition: int, key: str, cause: str) -> Eviction:
        state = self._states[partition][key]
        eviction = Eviction(partition, key, cause, state.n, state.watermark)
        self.end(partition, key)
        return eviction

    # -- partitions -------------------------------------------------------------
    def install(self, partition: int, key: str, state: SequenceState) -> None:
        """Put a restored state in place (restore happens before the partition resumes)."""
        states = self._states.setdefault(partition, OrderedDict())
        if state.tensors is None and state.n == 0 and state.exact:
            if states.pop(key, None) is not None:
                self._count -= 1
            self._remember(partition, key, state)
            return
        if self._ended.get(partition, {}).pop(key, None) is not None:
            self._stepped.pop((partition, key), None)
        if key not in states:
            self._count += 1
        states[key] = state  # its last_seen is the snapshot's last use

    def drop_partition(self, partition: int) -> int:
        """Forget a partition this process no longer owns; returns how many states went."""
        self._high.pop(partition, None)
        for key in self._ended.pop(partition, {}):
            self._stepped.pop((partition, key), None)
        self._committed.pop(partition, None)
        self._forgotten.pop(partition, None)
        self._dirty.pop(partition, None)
        dropped = len(self._states.pop(partition, {}))
        self._count -= dropped
        return dropped

    def state_bytes(self) -> int:
        return sum(t.nbytes for _, _, s in self for t in s.tensors or ())

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[int, str, SequenceState]]:
        for partition, states in self._states.items():
            for key, state in states.items():
                yield partition, key, state
