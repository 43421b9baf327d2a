"""Connected components of an edge DataFrame, computed in Spark (nothing collected to the driver).

Algorithm: alternating Large-Star / Small-Star (Kiveris et al., "Connected Components in
MapReduce and Beyond", SoCC 2014). Both steps only ever re-attach a node to a *smaller* node of
its own component, so the edge set shrinks towards one star per component centred on the
component's minimum node; the paper bounds the rounds by O(log² n), and a 1,000-node chain
converges in about a dozen. Node ids are compared as values (strings compare lexicographically),
so the result — ``component`` = the smallest node id of the component — depends only on the
edge set: deterministic, and independent of partitioning and of the order edges arrived in.

The loop stops as soon as the edge set *is* a star forest (every node has at most one edge to a
smaller node, and no such target has a smaller neighbour itself): then each star's centre is its
component's minimum and the labels can be read off. Checking that is one aggregation, and graphs
that already are stars (exact-duplicate groups) need no round at all. Each round's edges are
locally checkpointed so the query plan does not grow with the iteration count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame


class ComponentsDidNotConverge(RuntimeError):
    """Raised when the star iterations exceed ``max_iterations`` (a bug or an absurd graph)."""


def _normalise(edges: DataFrame, a: str, b: str, distinct: bool = True) -> DataFrame:
    """Undirected edges as (u, v) with u > v; self-loops (and, if ``distinct``, repeats) dropped."""
    from pyspark.sql import functions as F

    normalised = edges.select(
        F.greatest(F.col(a), F.col(b)).alias("u"), F.least(F.col(a), F.col(b)).alias("v")
    ).where(F.col("u") != F.col("v"))
    return normalised.distinct() if distinct else normalised


def large_star(edges: DataFrame) -> DataFrame:
    """Every node hands its *larger* neighbours to the minimum of its closed neighbourhood."""
    from pyspark.sql import functions as F

    both = edges.select(F.col("u").alias("node"), F.col("v").alias("nbr")).unionByName(
        edges.select(F.col("v").alias("node"), F.col("u").alias("nbr"))
    )
    minima = both.groupBy("node").agg(F.min("nbr").alias("min_nbr")).select(
        "node", F.least(F.col("node"), F.col("min_nbr")).alias("star")
    )
    moved = both.where(F.col("nbr") > F.col("node")).join(minima, "node").select(
        F.col("nbr").alias("a"), F.col("star").alias("b")
    )
    # Repeats are harmless here: Small-Star, which always follows, removes them.
    return _normalise(moved, "a", "b", distinct=False)


def small_star(edges: DataFrame) -> DataFrame:
    """Every node and its *smaller* neighbours are attached to the minimum among them."""
    from pyspark.sql import functions as F

    minima = edges.groupBy("u").agg(F.min("v").alias("star"))
    moved = edges.join(minima, "u").select(F.col("v").alias("a"), F.col("star").alias("b")).unionByName(
        minima.select(F.col("u").alias("a"), F.col("star").alias("b"))
    )
    return _normalise(moved, "a", "b")


def is_star_forest(edges: DataFrame) -> bool:
    """True when every node has at most one edge towards a smaller node and no such edge's
    target has one itself: each component is then a star centred on its minimum."""
    from pyspark.sql import functions as F

    roles = edges.select(F.col("u").alias("node"), F.lit(1).alias("up"), F.lit(0).alias("down")).unionByName(
        edges.select(F.col("v").alias("node"), F.lit(0).alias("up"), F.lit(1).alias("down"))
    )
    bad = roles.groupBy("node").agg(F.sum("up").alias("up"), F.sum("down").alias("down")).where(
        (F.col("up") > 1) | ((F.col("up") > 0) & (F.col("down") > 0))
    )
    return bad.isEmpty()


def connected_components(edges: DataFrame, src: str = "src", dst: str = "dst",
                         max_iterations: int = 200) -> DataFrame:
    """``(node, component)`` for every node that appears in ``edges``.

    ``component`` is the smallest node id of the node's connected component (the component
    root maps to itself). Edge direction is ignored; self-loops make a singleton component.
    """
    from pyspark.sql import functions as F

    nodes = edges.select(F.col(src).alias("node")).unionByName(edges.select(F.col(dst).alias("node")))
    nodes = nodes.where(F.col("node").isNotNull()).distinct()
    current = _normalise(edges.where(F.col(src).isNotNull() & F.col(dst).isNotNull()), src, dst)
    current = current.localCheckpoint(eager=True)
    for _ in range(max_iterations):
        if is_star_forest(current):
            break
        current = small_star(large_star(current)).localCheckpoint(eager=True)
    else:
        raise ComponentsDidNotConverge(
            f"connected components did not converge in {max_iterations} Large-Star/Small-Star rounds; "
            "raise max_iterations or check the edge input for corrupt ids"
        )
    # A star forest: every non-root node has exactly one edge, to its component's minimum.
    labels = current.select(F.col("u").alias("node"), F.col("v").alias("component"))
    return nodes.join(labels, "node", "left").select(
        "node", F.coalesce(F.col("component"), F.col("node")).alias("component")
    )
