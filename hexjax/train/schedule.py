"""The order in which one pipeline replica issues its forward and backward work (1F1B)."""

from __future__ import annotations


def stage_ops(num_stages: int, microbatches: int, stage: int) -> list[tuple[str, int]]:
    """One stage's 1F1B sequence of ``("F", m)``/``("B", m)``: ``min(S - s - 1, M)`` warmup
    forwards, then one forward and one backward in turn, then the remaining backwards."""
    m_total = microbatches
    warm = min(num_stages - stage - 1, m_total)
    ops = [("F", m) for m in range(warm)]
    for i in range(m_total - warm):
        ops += [("F", warm + i), ("B", i)]
    ops += [("B", m) for m in range(m_total - warm, m_total)]
    return ops


def one_f_one_b(num_stages: int, microbatches: int) -> list[tuple[str, int, int]]:
    """Every ``(op, stage, microbatch)`` of a 1F1B step in an order that respects the dependencies
    (F of stage s after F of s-1; B of s after its own F and after B of s+1), interleaving the
    stages round-robin so that each device's queue gets work as early as possible.

    Stage ``s`` holds at most ``min(S - s, M)`` microbatches' activations at any time.
    """
    if num_stages < 1 or microbatches < 1:
        raise ValueError(f"need at least one stage and one microbatch, got {num_stages} and {microbatches}")
    queues = [stage_ops(num_stages, microbatches, s) for s in range(num_stages)]
    done: set[tuple[str, int, int]] = set()
    order: list[tuple[str, int, int]] = []

    def ready(op: str, s: int, m: int) -> bool:
        if op == "F":
            return s == 0 or ("F", s - 1, m) in done
        return ("F", s, m) in done and (s == num_stages - 1 or ("B", s + 1, m) in done)

    total = sum(map(len, queues))
    while len(order) < total:
        progressed = False
        for s, q in enumerate(queues):
            if q and ready(q[0][0], s, q[0][1]):
                op, m = q.pop(0)
                done.add((op, s, m))
                order.append((op, s, m))
                progressed = True
        if not progressed:  # cannot happen for 1F1B; guards against edits to stage_ops
            raise RuntimeError("1F1B schedule deadlocked")
    return order


def max_live_activations(order: list[tuple[str, int, int]], num_stages: int) -> list[int]:
    """Most microbatches each stage holds between their forward and backward in ``order``."""
    live = [0] * num_stages
    peak = [0] * num_stages
    for op, s, _ in order:
        live[s] += 1 if op == "F" else -1
        peak[s] = max(peak[s], live[s])
    return peak
