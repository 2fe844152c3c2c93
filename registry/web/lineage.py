"""The lineage page: base -> adapters -> exported checkpoints, drawn as an inline SVG."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response

from peftreg.registry.api.deps import authorize, in_read_transaction
from peftreg.registry.catalog.lineage import Lineage, LineageNode, lineage_of
from peftreg.registry.catalog.repositories import valid_name
from peftreg.registry.web.browse import services_of
from peftreg.registry.web.rendering import WebRoute, page, short_digest
from peftreg.registry.web.session import Viewer, get_viewer

router = APIRouter(prefix="/ui", route_class=WebRoute, include_in_schema=False)
ViewerDep = Annotated[Viewer, Depends(get_viewer)]

COLUMNS = (16, 316, 616)
NODE_WIDTH, NODE_HEIGHT, ROW = 260, 48, 64


@dataclass(frozen=True)
class Box:
    x: int
    y: int
    title: str
    subtitle: str
    css: str


@dataclass(frozen=True)
class Edge:
    path: str


def label(node: LineageNode) -> str:
    name = node.repository
    return f"{name}:{node.tags[0]}" if node.tags else f"{name}@{short_digest(node.digest)}"


def _recipe_line(node: LineageNode) -> str:
    recipe = node.recipe or {}
    quantization = recipe.get("quantization") or {}
    merge = recipe.get("merge") or {}
    method = quantization.get("quantization") if isinstance(quantization, dict) else None
    dtype = merge.get("dtype") if isinstance(merge, dict) else None
    quantized = f"int4 g{quantization.get('group_size')}" if method == "int4" else "merged"
    return f"{quantized} · {dtype or 'base dtype'}"


def _edge(start: tuple[int, int], end: tuple[int, int]) -> Edge:
    (x1, y1), (x2, y2) = start, end
    middle = (x1 + x2) // 2
    return Edge(f"M{x1},{y1} C{middle},{y1} {middle},{y2} {x2},{y2}")


def layout(lineage: Lineage) -> tuple[list[Box], list[Edge], int]:
    """Boxes and edges of the picture, and its height: one row per export (at least one)."""
    boxes: list[Box] = []
    edges: list[Edge] = []
    y = 8
    adapter_anchors = []
    for item in lineage.adapters:
        rows = max(1, len(item.exports))
        top = y + (rows - 1) * ROW // 2
        boxes.append(Box(COLUMNS[1], top, label(item.adapter), item.adapter.kind, "adapter"))
        adapter_anchors.append(top + NODE_HEIGHT // 2)
        for offset, export in enumerate(item.exports):
            export_y = y + offset * ROW
            boxes.append(Box(COLUMNS[2], export_y, label(export), _recipe_line(export), "export"))
            edges.append(
                _edge(
                    (COLUMNS[1] + NODE_WIDTH, top + NODE_HEIGHT // 2),
                    (COLUMNS[2], export_y + NODE_HEIGHT // 2),
                )
            )
        y += rows * ROW
    height = max(y, ROW + 8)
    base_y = (height - NODE_HEIGHT) // 2
    if lineage.base is not None:
        boxes.append(Box(COLUMNS[0], base_y, label(lineage.base), "base (registered)", "base"))
    else:
        fingerprint = short_digest(lineage.base_fingerprint) if lineage.base_fingerprint else "-"
        boxes.append(Box(COLUMNS[0], base_y, "base not registered", fingerprint, "base missing"))
    for anchor in adapter_anchors:
        edges.append(
            _edge((COLUMNS[0] + NODE_WIDTH, base_y + NODE_HEIGHT // 2), (COLUMNS[1], anchor))
        )
    return boxes, edges, height


@router.get("/r/{name:path}/-/lineage/{reference}")
async def lineage(name: str, reference: str, request: Request, viewer: ViewerDep) -> Response:
    valid_name(name)
    authorize(viewer.principal, "read", name)
    services = services_of(request)
    found = await in_read_transaction(
        services,
        partial(
            lineage_of,
            store=services.store,
            principal=viewer.principal,
            repository=name,
            reference=reference,
        ),
    )
    boxes, edges, height = layout(found)
    context = {
        "repository": name,
        "reference": reference,
        "lineage": found,
        "boxes": boxes,
        "edges": edges,
        "height": height,
        "width": COLUMNS[2] + NODE_WIDTH + 16,
        "node_width": NODE_WIDTH,
        "node_height": NODE_HEIGHT,
        "label": label,
    }
    return page(request, viewer, "lineage.html", context)
