"""Walking an ONNX graph's sub-graphs (If/Loop/Scan bodies): a leaf module (no edgeopt imports), shared by the
graph checks, the passes and control-flow folding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import onnx


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph and every sub-graph in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("g"):
                yield from all_graphs(a.g)
            for g in a.graphs:
                yield from all_graphs(g)
