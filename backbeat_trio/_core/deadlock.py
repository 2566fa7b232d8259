"""Deadlocks in a wait-for graph, sans-IO: the cycles the reverb reports as ``deadlock``.

The graph's nodes are agents; an edge runs from an agent to each agent it waits for. Each
strongly connected component that holds a cycle is one deadlocked group, named by the shortest
cycle through its smallest agent.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["deadlock_groups", "find_deadlocks"]


def find_deadlocks(wait_for: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Find the deadlocked groups of a wait-for graph.

    Args:
        wait_for: each agent's out-edges (the agents it waits for). Targets that are not keys are
            ignored (they wait for nothing, so cannot be on a cycle).

    Returns:
        One cycle per strongly connected component that holds a cycle, as a closed path
        ``[a, b, ..., a]`` starting at the component's smallest agent and taking the shortest
        cycle through it (ties broken by agent id); sorted by that first agent.
    """
    return [cycle for cycle, _ in deadlock_groups(wait_for)]


def deadlock_groups(wait_for: Mapping[str, Iterable[str]]) -> list[tuple[list[str], set[str]]]:
    graph = {a: sorted({b for b in bs if b in wait_for}) for a, bs in wait_for.items()}
    groups = []
    for comp in _strongly_connected(graph):
        start = min(comp)
        if len(comp) == 1 and start not in graph[start]:
            continue
        groups.append((_shortest_cycle(graph, start, comp), comp))
    groups.sort(key=lambda g: g[0][0])
    return groups


def _strongly_connected(graph: Mapping[str, list[str]]) -> list[set[str]]:
    # Tarjan's algorithm, iterative so a long wait chain cannot hit the recursion limit.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[set[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, int]] = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            succs = graph[node]
            if i < len(succs):
                work.append((node, i + 1))
                nxt = succs[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                comp: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.add(member)
                    if member == node:
                        break
                comps.append(comp)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return comps


def _shortest_cycle(graph: Mapping[str, list[str]], start: str, comp: set[str]) -> list[str]:
    # Breadth-first from start inside its component until an edge leads back to start.
    parent: dict[str, str] = {}
    frontier = [start]
    seen = {start}
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for succ in graph[node]:
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if succ in comp and succ not in seen:
                    seen.add(succ)
                    parent[succ] = node
                    nxt_frontier.append(succ)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start} in its component")  # pragma: no cover
