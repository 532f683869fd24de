"""The static memory plan of the ``mcu`` target: every intermediate tensor gets a fixed
byte offset in one arena, decided at compile time, so the generated C needs no allocator.

A microcontroller has tens to hundreds of KiB of RAM and no heap worth the name, and the
ONNX-to-C generators one finds keep every intermediate tensor alive for the whole run: on
a 4-layer 16-channel 32x32 conv net that is 448 KiB where two 64 KiB buffers suffice. The
plan here works on an abstract schedule (``Step``s over tensor names and byte sizes), so
it is unit-tested without ONNX:

1. **Storage.** A step of kind ``alias`` (Reshape, Flatten, ...) writes nothing: its output
   *is* its input's bytes. A step of kind ``inplace`` (elementwise ops, activations) may
   write over an input of the output's size when that input's storage dies at the step
   (a read of element i precedes the write of element i). Storage shared so forms one
   *buffer* whose lifetime spans all its tensors.
2. **Lifetimes.** A buffer lives from the step that writes it to the last step reading
   any of its tensors, both inclusive: an input and an output of the same step overlap in
   time, so a convolution never writes over what it reads.
3. **Order.** The graph's topological order, or a memory-greedy one (``plan_best_order``)
   where that needs a smaller arena: a branchy graph then finishes one branch before the
   next instead of keeping both alive.
4. **Offsets.** Buffers are placed largest first (TFLite Micro's greedy planner); each
   goes into the smallest gap between the buffers already placed that overlap it in time
   (best fit), else on top. Offsets are multiples of ``alignment``.

Tensors named ``external`` (graph inputs and outputs) live in the caller's memory, not the
arena; an alias of one is that caller's memory too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ALIGNMENT = 16  # bytes: enough for any SIMD load a Cortex-M kernel does, and for doubles


@dataclass(frozen=True)
class Step:
    """One operator of the schedule: the activation tensors it reads and writes."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kind: str = "compute"  # "compute" | "alias" | "inplace"
    # For ``inplace``: the inputs (by position) whose storage the output may take (same
    # size as the output and read element for element: not broadcast).
    shareable: tuple[int, ...] = ()


@dataclass
class Buffer:
    """One region of the arena: the tensors stored in it and when it is live."""

    name: str  # the tensor that created it
    size: int  # bytes
    first: int  # step index writing it
    last: int  # last step index reading any of its tensors
    tensors: list[str] = field(default_factory=list)
    offset: int = -1

    def live_with(self, other: "Buffer") -> bool:
        return self.first <= other.last and other.first <= self.last

    def end(self) -> int:
        return self.offset + self.size


@dataclass
class Plan:
    """Where each tensor lives: ``storage[t]`` is the buffer (or external tensor) holding
    ``t``; ``offset(t)`` its byte offset in the arena (``None``: external memory)."""

    buffers: list[Buffer]
    storage: dict[str, str]
    external: frozenset[str]
    arena_bytes: int
    naive_bytes: int  # every intermediate tensor kept alive, none shared
    largest_bytes: int  # the largest single intermediate tensor
    inplace: list[str]  # steps that write over an input

    def offset(self, tensor: str) -> int | None:
        root = self.storage[tensor]
        return None if root in self.external else self._by_name[root].offset

    def __post_init__(self) -> None:
        self._by_name = {b.name: b for b in self.buffers}

    def to_dict(self) -> dict:
        return {"arena_bytes": self.arena_bytes, "no_reuse_bytes": self.naive_bytes,
                "largest_tensor_bytes": self.largest_bytes, "alignment": ALIGNMENT,
                "inplace_steps": self.inplace,
                "buffers": [{"offset": b.offset, "bytes": b.size, "live": [b.first, b.last],
                             "tensors": b.tensors} for b in
                            sorted(self.buffers, key=lambda b: (b.offset, b.first))]}


def aligned(size: int, alignment: int = ALIGNMENT) -> int:
    return -(-size // alignment) * alignment


def plan_memory(steps: list[Step], sizes: dict[str, int], external: set[str] | frozenset[str],
                alignment: int = ALIGNMENT) -> Plan:
    """The plan of ``steps`` (in execution order) whose tensors have ``sizes`` bytes.
    A tensor no step produces and not ``external`` is an error (the schedule is
    incomplete): the caller lists graph inputs as external."""
    external = frozenset(external)
    last_use: dict[str, int] = {}
    for i, step in enumerate(steps):
        for t in step.inputs:
            last_use[t] = i
    storage: dict[str, str] = {t: t for t in external}
    buffers: dict[str, Buffer] = {}
    inplace: list[str] = []
    naive = largest = 0
    for i, step in enumerate(steps):
        missing = [t for t in step.inputs if t not in storage]
        if missing:
            raise ValueError(f"step {step.name!r} reads {missing[0]!r} before any step "
                             f"writes it")
        for out in step.outputs:
            if out in storage and out not in external:
                raise ValueError(f"tensor {out!r} is written twice (step {step.name!r})")
        if step.kind == "alias":
            (src,), (out,) = step.inputs, step.outputs
            if out in external and storage[src] != out:
                raise ValueError(f"alias step {step.name!r} writes the external tensor "
                                 f"{out!r}: it must copy")
            _join(storage, buffers, storage[src], out, last_use, i)
            continue
        for k, out in enumerate(step.outputs):
            if out in external:
                continue
            size = sizes[out]
            naive += size
            largest = max(largest, size)
            shared = _shareable(step, k, storage, buffers, sizes, last_use, i) \
                if step.kind == "inplace" else None
            if shared is not None:
                _join(storage, buffers, shared, out, last_use, i)
                inplace.append(step.name)
                continue
            storage[out] = out
            buffers[out] = Buffer(out, size, i, max(i, last_use.get(out, i)), [out])
    ordered = list(buffers.values())
    arena = _place(ordered, alignment)
    return Plan(ordered, storage, external, arena, naive, largest, inplace)


def _shareable(step: Step, k: int, storage, buffers, sizes, last_use, i) -> str | None:
    """The buffer of an input ``step`` may overwrite with output ``k``: the input's whole
    buffer dies at this step and has exactly the output's size."""
    for pos in step.shareable:
        root = storage[step.inputs[pos]]
        if root in buffers and buffers[root].last <= i and \
                buffers[root].size == sizes[step.outputs[k]] and \
                all(last_use.get(t, -1) <= i for t in buffers[root].tensors):
            return root
    return None


def _join(storage, buffers, root: str, tensor: str, last_use, i: int) -> None:
    storage[tensor] = root
    buf = buffers.get(root)
    if buf is not None:  # an arena buffer (not external memory): extend its life
        buf.tensors.append(tensor)
        buf.last = max(buf.last, last_use.get(tensor, i), i)


def _place(buffers: list[Buffer], alignment: int) -> int:
    """Greedy by size, best-fit gap; returns the arena's size in bytes."""
    placed: list[Buffer] = []
    top = 0
    for buf in sorted(buffers, key=lambda b: (-b.size, b.first, b.name)):
        need = aligned(buf.size, alignment)
        busy = sorted((b for b in placed if b.live_with(buf)), key=lambda b: b.offset)
        best, best_gap, cursor = None, None, 0
        for other in busy:
            gap = other.offset - cursor
            if gap >= need and (best_gap is None or gap < best_gap):
                best, best_gap = cursor, gap
            cursor = max(cursor, aligned(other.end(), alignment))
        buf.offset = cursor if best is None else best
        placed.append(buf)
        top = max(top, aligned(buf.end(), alignment))
    return top


def memory_greedy_order(steps: list[Step], sizes: dict[str, int],
                        external: set[str] | frozenset[str]) -> list[int]:
    """A topological order of ``steps`` that runs next the ready step adding the fewest
    live bytes (its outputs minus the inputs it is the last reader of): on a branchy
    graph this finishes a branch, freeing its tensors, before starting the next."""
    producer = {t: i for i, s in enumerate(steps) for t in s.outputs}
    deps = [{producer[t] for t in s.inputs if t in producer} for s in steps]
    pending = {}  # tensor -> steps still to read it
    for i, s in enumerate(steps):
        for t in s.inputs:
            pending.setdefault(t, set()).add(i)

    def growth(i: int) -> tuple[int, int]:
        s = steps[i]
        added = 0 if s.kind == "alias" else \
            sum(sizes[t] for t in s.outputs if t not in external)
        freed = sum(sizes[t] for t in set(s.inputs) if t not in external and
                    pending[t] == {i} and steps[producer[t]].kind != "alias")
        return added - freed, i

    order: list[int] = []
    done: set[int] = set()
    ready = {i for i, d in enumerate(deps) if not d}
    while ready:
        i = min(ready, key=growth)
        ready.discard(i)
        done.add(i)
        order.append(i)
        for t in steps[i].inputs:
            pending[t].discard(i)
        ready |= {j for j in range(len(steps)) if j not in done and j not in ready and
                  deps[j] <= done}
    if len(order) != len(steps):
        raise ValueError("the steps do not form a DAG")
    return order


def plan_best_order(steps: list[Step], sizes: dict[str, int],
                    external: set[str] | frozenset[str]) -> tuple[list[int], Plan]:
    """``(order, plan)``: the steps' own order or ``memory_greedy_order``, whichever
    needs the smaller arena (the given order on a tie)."""
    best: tuple[list[int], Plan] | None = None
    for order in (list(range(len(steps))), memory_greedy_order(steps, sizes, external)):
        plan = plan_memory([steps[i] for i in order], sizes, external)
        if best is None or plan.arena_bytes < best[1].arena_bytes:
            best = (order, plan)
    return best


def overlaps(plan: Plan) -> list[tuple[str, str]]:
    """Pairs of buffers live at the same time whose bytes overlap (empty for a valid
    plan), plus any buffer reaching past the arena (paired with itself)."""
    bad = [(b.name, b.name) for b in plan.buffers
           if b.offset < 0 or b.end() > plan.arena_bytes]
    for i, a in enumerate(plan.buffers):
        for b in plan.buffers[i + 1:]:
            if a.live_with(b) and a.offset < b.end() and b.offset < a.end():
                bad.append((a.name, b.name))
    return bad
