"""A lineage graph laid out for drawing: every node placed in a row, every edge a curve with its relation.

The browser only draws (Vega marks over these coordinates); the layout is computed here, so it is the
same on every screen, costs nothing in the page, and is tested in Python. It is a small layered layout
(Sugiyama's three steps, simplified): a node's row is the longest path from it up to a node with no
origins, so every edge points up, from a child to what it came from (bases and datasets on top, the
version at the bottom); rows are ordered by the mean position of their neighbours, a few sweeps; nodes
are then packed left to right and each row centred.
"""

from __future__ import annotations

from urllib.parse import quote

from ..lineage import Lineage, Node

NODE_HEIGHT = 52
ROW_GAP = 70  # room between rows for the relation labels on the edges
COLUMN_GAP = 28
CHAR_WIDTH = 6.6  # of the 11 px sans-serif the page uses; labels longer than MAX_WIDTH are cut by the browser
MIN_WIDTH, MAX_WIDTH = 120, 260
SWEEPS = 4
DUMMY_WIDTH = 16  # the room an edge passing through a row takes in it


def href(node: Node) -> str | None:
    """The page of a node, relative to the web page's root; None for what has no page here (a remote source)."""
    if not node.found:
        return None
    if node.kind == "adapter":
        return f"version/{quote(node.label, safe='@')}"
    if node.kind == "base":
        return f"base/{node.sha256}"
    if node.kind == "dataset":
        return f"dataset/{node.sha256}"
    if node.kind == "fused":
        return f"fused/{node.sha256}"
    if node.kind == "checkpoint" and node.record.get("run_id"):
        return f"run/{quote(node.record['run_id'], safe='')}"
    return None


def _rows(lineage: Lineage) -> dict[str, int]:
    """Row of each node: 0 for nodes with no origins in the graph, else one more than its highest origin.

    A damaged registry can hold a cycle (verify reports it); relaxation stops after as many passes as
    there are nodes, so a cycle gives a drawing with an edge pointing down, never a hang.
    """
    origins: dict[str, list[str]] = {node_id: [] for node_id in lineage.nodes}
    for edge in lineage.edges:
        origins[edge.child].append(edge.parent)
    row = {node_id: 0 for node_id in lineage.nodes}
    for _ in range(len(row)):
        changed = False
        for child, parents in origins.items():
            wanted = max((row[p] + 1 for p in parents), default=0)
            if wanted > row[child]:
                row[child], changed = wanted, True
        if not changed:
            break
    return row


def _order(ids: list[str], links: list[tuple[str, str]], row: dict[str, int]) -> list[list[str]]:
    """Nodes of each row, ordered to keep edges short: the barycentre heuristic, sweeping down then up."""
    rows: list[list[str]] = [[] for _ in range(max(row.values(), default=-1) + 1)]
    for node_id in ids:  # the walk's order: the records' order, so the first parent comes first
        rows[row[node_id]].append(node_id)
    neighbours: dict[str, list[str]] = {node_id: [] for node_id in ids}
    for child, parent in links:
        neighbours[child].append(parent)
        neighbours[parent].append(child)
    for sweep in range(SWEEPS):
        indices = range(1, len(rows)) if sweep % 2 == 0 else range(len(rows) - 2, -1, -1)
        for i in indices:
            fixed = rows[i - 1] if sweep % 2 == 0 else rows[i + 1]
            where = {node_id: k for k, node_id in enumerate(fixed)}

            def centre(node_id: str, current: int) -> float:
                placed = [where[n] for n in neighbours[node_id] if n in where]
                return sum(placed) / len(placed) if placed else current

            rows[i] = [n for _, _, n in sorted((centre(n, k), k, n) for k, n in enumerate(rows[i]))]
    return rows


def _width(node: Node) -> float:
    longest = max(len(node.kind) + 12, len(node.label), 19)  # 19: "sha256 " + 12 hex digits
    return max(MIN_WIDTH, min(MAX_WIDTH, 16 + CHAR_WIDTH * longest))


def _bezier(p0: tuple[float, float], p3: tuple[float, float], t: float) -> tuple[float, float]:
    """The point at `t` of the vertical-tangent cubic from p0 to p3 (the curve every edge segment is drawn as)."""
    bend = (p0[1] + p3[1]) / 2
    a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
    return (a * p0[0] + b * p0[0] + c * p3[0] + d * p3[0], a * p0[1] + (b + c) * bend + d * p3[1])


def _segment(p0: tuple[float, float], p3: tuple[float, float]) -> str:
    bend = (p0[1] + p3[1]) / 2
    return f"C{p0[0]:.1f},{bend:.1f} {p3[0]:.1f},{bend:.1f} {p3[0]:.1f},{p3[1]:.1f}"


def _label_box(x: float, y: float, text: str) -> tuple[float, float, float, float]:
    half = (len(text) * 6 + 10) / 2
    return (x - half, y - 8, x + half, y + 8)


def _overlaps(box: tuple[float, float, float, float], others: list[tuple[float, float, float, float]]) -> bool:
    return any(box[0] < o[2] and o[0] < box[2] and box[1] < o[3] and o[1] < box[3] for o in others)


def layout(lineage: Lineage, statuses: dict[str, str] | None = None) -> dict:
    """The graph as the page draws it: nodes with x, y (top-left), width, height and their page; edges with an
    SVG path from the child's top to the origin's bottom and the point where the relation is written.

    An edge that spans rows passes through a placeholder in each row between (Sugiyama's dummy nodes), so
    it never runs behind a node; its relation is written on the part nearest the child, where it is free.

    Args:
        statuses: node id -> audit status (ok, changed, missing, unchecked), shown on the nodes when given.
    """
    row = _rows(lineage)
    ids, links, chains = list(lineage.nodes), [], []
    for i, edge in enumerate(lineage.edges):
        span = row[edge.child] - row[edge.parent]
        dummies = [f"\0{i}.{k}" for k in range(1, span)]  # a NUL never starts a node id
        for k, dummy in enumerate(dummies, start=1):
            row[dummy] = row[edge.child] - k
        ids += dummies
        chain = [edge.child, *dummies, edge.parent]
        links += list(zip(chain, chain[1:]))
        chains.append(chain)
    rows = _order(ids, links, row)
    width = {n: _width(lineage.nodes[n]) if n in lineage.nodes else DUMMY_WIDTH for n in ids}
    row_widths = [sum(width[n] for n in r) + COLUMN_GAP * (len(r) - 1) for r in rows]
    total_width = max(row_widths, default=0)
    x_of: dict[str, float] = {}
    for i, members in enumerate(rows):
        x = (total_width - row_widths[i]) / 2
        for node_id in members:
            x_of[node_id] = x
            x += width[node_id] + COLUMN_GAP
    top = {n: row[n] * (NODE_HEIGHT + ROW_GAP) for n in ids}
    placed = [{"id": node_id, "kind": node.kind, "label": node.label, "sha256": node.sha256, "found": node.found,
               "root": node_id == lineage.root, "href": href(node), "x": round(x_of[node_id], 1), "y": top[node_id],
               "width": round(width[node_id], 1), "height": NODE_HEIGHT, "title": node.title,
               "status": (statuses or {}).get(node_id)}
              for members in rows for node_id in members if (node := lineage.nodes.get(node_id))]
    edges, taken = [], [(p["x"], p["y"], p["x"] + p["width"], p["y"] + NODE_HEIGHT) for p in placed]
    for edge, chain in zip(lineage.edges, chains):
        centre = {n: x_of[n] + width[n] / 2 for n in chain}
        start = (centre[edge.child], top[edge.child])
        path, point = [f"M{start[0]:.1f},{start[1]:.1f}"], start
        for n in chain[1:]:
            bottom = (centre[n], top[n] + NODE_HEIGHT)
            path.append(_segment(point, bottom))
            if n != edge.parent:  # through the placeholder's row, straight up
                path.append(f"L{centre[n]:.1f},{top[n]:.1f}")
            point = (centre[n], top[n])
        first = (centre[chain[1]], top[chain[1]] + NODE_HEIGHT)
        # The first free spot along the part nearest the child, so crossing edges keep their labels apart.
        for t in (0.5, 0.35, 0.65, 0.25, 0.75, 0.5):
            label = _bezier(start, first, t)
            box = _label_box(*label, edge.relation)
            if not _overlaps(box, taken):
                break
        taken.append(box)
        edges.append({"child": edge.child, "parent": edge.parent, "relation": edge.relation, "path": " ".join(path),
                      "label_x": round(label[0], 1), "label_y": round(label[1], 1),
                      "arrow_x": round(centre[edge.parent], 1), "arrow_y": round(top[edge.parent] + NODE_HEIGHT + 5, 1)})
    height = len(rows) * (NODE_HEIGHT + ROW_GAP) - ROW_GAP if rows else 0
    return {"root": lineage.root, "direction": lineage.direction, "width": round(total_width, 1), "height": height,
            "nodes": placed, "edges": edges}
