"""Connected components in Spark vs a pure-Python union-find reference."""

from __future__ import annotations

import random

import pytest

from spark_jobs.transforms.components import connected_components

pytestmark = pytest.mark.spark


def union_find(edges: list[tuple[str, str]]) -> dict[str, str]:
    """Reference: node → smallest node id of its component."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {node: find(node) for node in list(parent)}


def spark_components(spark, edges: list[tuple[str, str]], partitions: int = 3) -> dict[str, str]:
    df = spark.createDataFrame(edges, "src string, dst string").repartition(partitions)
    return {r["node"]: r["component"] for r in connected_components(df).collect()}


def ids(rng: random.Random, n: int) -> list[str]:
    """Node ids whose string order is unrelated to graph position (so chains are not pre-sorted)."""
    names = [f"doc-{rng.randrange(10**9):09d}-{i}" for i in range(n)]
    rng.shuffle(names)
    return names


def test_chain_star_and_disjoint_graphs_match_union_find(spark) -> None:
    rng = random.Random(7)
    chain = ids(rng, 128)
    chain_edges = [(chain[i], chain[i + 1]) for i in range(len(chain) - 1)]
    hub, *leaves = ids(rng, 40)
    star_edges = [(leaf, hub) for leaf in leaves]  # centre is not the smallest id
    pairs = [tuple(ids(rng, 2)) for _ in range(20)]  # twenty disjoint 2-node components
    triangle = ids(rng, 3)
    tri_edges = [(triangle[0], triangle[1]), (triangle[1], triangle[2]), (triangle[2], triangle[0])]
    edges = chain_edges + star_edges + pairs + tri_edges
    edges += [(b, a) for a, b in edges[:50]] + edges[:30]  # reversed and repeated edges
    edges.append(("solo", "solo"))  # a self-loop is a singleton component
    rng.shuffle(edges)

    got = spark_components(spark, edges)
    assert got == union_find(edges)
    assert len(set(got.values())) == 1 + 1 + 20 + 1 + 1
    assert got[chain[-1]] == min(chain)
    assert got["solo"] == "solo"


def test_random_graph_is_deterministic_across_partitioning_and_edge_order(spark) -> None:
    rng = random.Random(11)
    nodes = ids(rng, 200)
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(170)]
    expected = union_find(edges)
    first = spark_components(spark, edges, partitions=1)
    shuffled = list(edges)
    rng.shuffle(shuffled)
    second = spark_components(spark, [(b, a) for a, b in shuffled], partitions=7)
    assert first == expected
    assert second == first
    assert len(set(first.values())) > 10  # a sparse graph: many components, some large


def test_empty_edges(spark) -> None:
    df = spark.createDataFrame([], "src string, dst string")
    assert connected_components(df).collect() == []
