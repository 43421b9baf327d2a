"""MinHash signatures, LSH band hashes and estimated Jaccard — pure numpy, unit-tested alone.

A document is the set of its hashed word ``k``-shingles (``ngrams.ngram_hashes``; a document with
fewer than ``k`` words is one shingle of all its words, an empty one the shingle of nothing).
Permutation ``i`` is the multiply-shift hash ``h_i(x) = (a_i·x + b_i mod 2⁶⁴) >> 32`` with a
seeded random odd ``a_i``: two multiply-adds per (shingle, permutation), vectorised over a whole
batch of documents, and ``minimum.reduceat`` takes the per-document minima. Signatures hold
uint32 values (stored as Spark longs); the fraction of equal positions estimates Jaccard with
standard deviation ``sqrt(J(1-J)/num_perm)``.

LSH: the signature is cut into ``bands`` bands of ``rows_per_band`` rows; each band is hashed to a
64-bit bucket id (band index folded into the seed). Two documents become candidates when any
band matches, with probability ``1 - (1 - J^r)^b`` (``candidate_probability``); candidates are
then verified with the estimated Jaccard, so the S-curve only has to be steep *below* the
threshold, not exactly at it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spark_jobs.transforms.ngrams import mix64, ngram_hashes, token_ids, word_tokens

_U64 = np.uint64
_POLY = _U64(0x100000001B3)
# Shingles per scratch block: the (num_perm × shingles) uint64 matrix stays ~1 MB, in cache.
_BLOCK_SHINGLES = 1024
# Documents with fewer shingles are packed into shared blocks (one reduceat per block).
_SHORT_SHINGLES = 128


@dataclass(frozen=True)
class MinHashParams:
    """Everything that defines a signature; two signatures are comparable only if these match."""

    shingle_words: int = 5
    num_perm: int = 128
    bands: int = 20
    rows_per_band: int = 6
    seed: int = 42

    def __post_init__(self) -> None:
        if self.shingle_words < 1 or self.num_perm < 1 or self.bands < 1 or self.rows_per_band < 1:
            raise ValueError(f"MinHash parameters must be positive: {self}")
        if self.bands * self.rows_per_band > self.num_perm:
            raise ValueError(
                f"bands × rows_per_band = {self.bands * self.rows_per_band} exceeds num_perm = "
                f"{self.num_perm}: lower bands/rows_per_band or raise num_perm"
            )

    @classmethod
    def from_settings(cls, dedup: object) -> MinHashParams:
        """Build from ``settings.dedup`` (a ``DedupSettings``)."""
        return cls(
            shingle_words=dedup.shingle_words, num_perm=dedup.num_perm,  # type: ignore[attr-defined]
            bands=dedup.bands, rows_per_band=dedup.rows_per_band, seed=dedup.seed,  # type: ignore[attr-defined]
        )


def permutation_coefficients(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded ``(a, b)`` uint64 arrays for the multiply-shift permutations (``a`` odd)."""
    rng = np.random.Generator(np.random.PCG64(seed))
    a = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False) | _U64(1)
    b = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64, endpoint=False)
    return a, b


def shingle_hashes(text: str, shingle_words: int) -> np.ndarray:
    """The hashed word shingles of ``text`` (never empty: see module docstring)."""
    ids = token_ids(word_tokens(text))
    if len(ids) == 0:
        return mix64(np.zeros(1, dtype=np.uint64))
    return ngram_hashes(ids, min(shingle_words, len(ids)))


def _permuted(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(num_perm × shingles) permuted values; this layout makes every reduction contiguous."""
    permuted = a[:, None] * shingles[None, :]
    permuted += b[:, None]
    permuted >>= _U64(32)
    return permuted


def _document_minima(shingles: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One document's signature, block by block so the scratch matrix stays in cache."""
    acc = _permuted(shingles[:_BLOCK_SHINGLES], a, b).min(axis=1)
    for start in range(_BLOCK_SHINGLES, len(shingles), _BLOCK_SHINGLES):
        np.minimum(acc, _permuted(shingles[start:start + _BLOCK_SHINGLES], a, b).min(axis=1), out=acc)
    return acc


def signatures(texts: Sequence[str], params: MinHashParams) -> np.ndarray:
    """MinHash signatures of ``texts``: a (len(texts), num_perm) uint64 array of uint32 values.

    Documents with many shingles reduce on their own (a contiguous SIMD ``min``); short ones are
    packed together and reduced with ``minimum.reduceat``, so per-call overhead is amortised.
    """
    a, b = permutation_coefficients(params.num_perm, params.seed)
    out = np.empty((len(texts), params.num_perm), dtype=np.uint64)
    batch: list[np.ndarray] = []
    batch_rows: list[int] = []
    batch_size = 0

    def flush() -> None:
        nonlocal batch_size
        if batch:
            offsets = np.cumsum([0] + [len(s) for s in batch[:-1]])
            out[batch_rows] = np.minimum.reduceat(_permuted(np.concatenate(batch), a, b), offsets, axis=1).T
            batch.clear()
            batch_rows.clear()
            batch_size = 0

    for row, text in enumerate(texts):
        shingles = shingle_hashes(text, params.shingle_words)
        if len(shingles) >= _SHORT_SHINGLES:
            out[row] = _document_minima(shingles, a, b)
            continue
        if batch_size + len(shingles) > _BLOCK_SHINGLES:
            flush()
        batch.append(shingles)
        batch_rows.append(row)
        batch_size += len(shingles)
    flush()
    return out


def band_hashes(signature_matrix: np.ndarray, bands: int, rows_per_band: int) -> np.ndarray:
    """LSH bucket ids: (n_docs, bands) uint64; band ``i`` hashes rows ``[i·r, (i+1)·r)``."""
    n_docs = signature_matrix.shape[0]
    if bands * rows_per_band > signature_matrix.shape[1]:
        raise ValueError(f"{bands} bands × {rows_per_band} rows exceed the signature length "
                         f"{signature_matrix.shape[1]}")
    cube = signature_matrix[:, : bands * rows_per_band].reshape(n_docs, bands, rows_per_band)
    h = np.broadcast_to(mix64(np.arange(1, bands + 1, dtype=np.uint64)), (n_docs, bands)).copy()
    for row in range(rows_per_band):
        h ^= cube[:, :, row]
        h *= _POLY
    return mix64(h)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature positions (the MinHash Jaccard estimate)."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signatures differ in length: {sig_a.shape} vs {sig_b.shape}")
    return float(np.mean(sig_a == sig_b))


def jaccard(a: set[int] | frozenset[int], b: set[int] | frozenset[int]) -> float:
    """Exact Jaccard similarity of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def candidate_probability(j: float, bands: int, rows_per_band: int) -> float:
    """Probability that two documents of Jaccard ``j`` share at least one LSH band."""
    return 1.0 - (1.0 - j**rows_per_band) ** bands


def _list_column(matrix: np.ndarray) -> object:
    """A 2-D int64 matrix as an Arrow ``list<int64>`` column (Spark ``array<long>``)."""
    import pyarrow as pa

    n_rows, width = matrix.shape
    offsets = pa.array(np.arange(0, n_rows * width + 1, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(matrix).reshape(-1), pa.int64()))


def signature_batches(params: MinHashParams):  # -> Callable[[Iterator[RecordBatch]], Iterator[RecordBatch]]
    """A ``mapInArrow`` function: ``(doc_id, text_hash, text)`` batches →
    ``(doc_id, text_hash, signature array<long>, band_hashes array<long>)``."""

    def compute(batches):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        for batch in batches:
            texts = [t or "" for t in batch.column("text").to_pylist()]
            sig = signatures(texts, params)
            bands = band_hashes(sig, params.bands, params.rows_per_band)
            yield pa.RecordBatch.from_arrays(
                [batch.column("doc_id"), batch.column("text_hash"),
                 _list_column(sig.view(np.int64)), _list_column(bands.view(np.int64))],
                names=["doc_id", "text_hash", "signature", "band_hashes"],
            )

    return compute


def estimate_margin(threshold: float, num_perm: int, z: float = 4.0) -> float:
    """How far below ``threshold`` an estimate can fall for a pair truly at the threshold
    (``z`` standard deviations of the binomial estimate); candidates below it are rejected
    without looking at their text."""
    return z * (threshold * (1 - threshold) / num_perm) ** 0.5


def exact_jaccard_batches(shingle_words: int):  # -> mapInArrow function
    """A ``mapInArrow`` function: ``(doc_a, doc_b, text_a, text_b)`` →
    ``(doc_a, doc_b, similarity)`` with the exact Jaccard of the two shingle sets."""

    def compute(batches):  # type: ignore[no-untyped-def]
        import pyarrow as pa

        for batch in batches:
            similarity = []
            for text_a, text_b in zip(batch.column("text_a").to_pylist(), batch.column("text_b").to_pylist(),
                                      strict=True):
                a = np.unique(shingle_hashes(text_a or "", shingle_words))
                b = np.unique(shingle_hashes(text_b or "", shingle_words))
                inter = len(np.intersect1d(a, b, assume_unique=True))
                similarity.append(inter / (len(a) + len(b) - inter))
            yield pa.RecordBatch.from_arrays(
                [batch.column("doc_a"), batch.column("doc_b"), pa.array(similarity, pa.float64())],
                names=["doc_a", "doc_b", "similarity"],
            )

    return compute
