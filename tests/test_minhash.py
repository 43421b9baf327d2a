"""MinHash signatures and LSH bands (pure numpy) on real sample texts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from spark_jobs.transforms.minhash import (
    MinHashParams,
    band_hashes,
    candidate_probability,
    estimated_jaccard,
    jaccard,
    shingle_hashes,
    signature_batches,
    signatures,
)
from tests.curation_fixtures import sample_texts, substitute_words


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [t for _, t in sample_texts(min_words=120, max_words=1500)][:80]


def test_estimated_jaccard_tracks_exact_jaccard(texts) -> None:
    """Unbiased, with the binomial spread sqrt(J(1-J)/num_perm) the theory predicts."""
    params = MinHashParams()
    rng = random.Random(3)
    pairs = [(t, substitute_words(t, rate, rng)) for t in texts for rate in (0.005, 0.02, 0.05, 0.1, 0.3)]
    sig_a = signatures([a for a, _ in pairs], params)
    sig_b = signatures([b for _, b in pairs], params)
    exact = np.array([jaccard(set(shingle_hashes(a, 5).tolist()), set(shingle_hashes(b, 5).tolist()))
                      for a, b in pairs])
    estimate = np.array([estimated_jaccard(x, y) for x, y in zip(sig_a, sig_b, strict=True)])
    errors = estimate - exact
    expected_sd = np.sqrt(np.mean(exact * (1 - exact)) / params.num_perm)
    assert exact.min() < 0.3 and exact.max() > 0.9  # the edit rates span the interesting range
    assert abs(errors.mean()) < 0.01
    assert errors.std() < 1.3 * expected_sd
    assert np.corrcoef(exact, estimate)[0, 1] > 0.98


def test_signatures_are_deterministic_and_order_independent(texts) -> None:
    params = MinHashParams()
    forward = signatures(texts, params)
    backward = signatures(texts[::-1], params)[::-1]
    assert np.array_equal(forward, backward)
    assert forward.shape == (len(texts), params.num_perm) and forward.max() < 2**32
    assert not np.array_equal(forward, signatures(texts, MinHashParams(seed=7)))
    same = signatures([texts[0], texts[0].upper()], params)
    assert np.array_equal(same[0], same[1])  # tokens are lower-cased


def test_block_size_does_not_change_signatures(texts, monkeypatch) -> None:
    """Batching and the block-by-block path for long documents give the same minima."""
    import spark_jobs.transforms.minhash as minhash

    docs = [*texts[:10], " ".join(texts)]  # the last one spans many blocks
    params = MinHashParams()
    reference = signatures(docs, params)
    monkeypatch.setattr(minhash, "_BLOCK_SHINGLES", 37)
    assert np.array_equal(signatures(docs, params), reference)


def test_short_and_empty_documents_get_one_shingle() -> None:
    assert len(shingle_hashes("two words", 5)) == 1
    assert len(shingle_hashes("", 5)) == 1
    assert len(shingle_hashes("a b c d e f", 5)) == 2
    params = MinHashParams()
    sig = signatures(["", "two words", "two words"], params)
    assert estimated_jaccard(sig[1], sig[2]) == 1.0
    assert estimated_jaccard(sig[0], sig[1]) < 0.1


def test_band_hashes_collide_only_for_equal_bands() -> None:
    rng = np.random.default_rng(0)
    sig = rng.integers(0, 2**32, size=(3, 128), dtype=np.uint64)
    sig[1, :8] = sig[0, :8]  # same first band only
    bands = band_hashes(sig, 16, 8)
    assert bands.shape == (3, 16)
    assert bands[0, 0] == bands[1, 0]
    assert (bands[0, 1:] != bands[1, 1:]).all()
    assert (bands[0] != bands[2]).all()
    swapped = sig.copy()
    swapped[0, :8], swapped[0, 8:16] = sig[0, 8:16], sig[0, :8]
    assert band_hashes(swapped, 16, 8)[0, 1] != bands[0, 0]  # band index is part of the bucket


def test_default_lsh_s_curve_favours_the_threshold() -> None:
    from jzlake.settings import load_settings

    params = MinHashParams.from_settings(load_settings(environ={}).dedup)
    p = lambda j: candidate_probability(j, params.bands, params.rows_per_band)  # noqa: E731
    assert p(0.8) > 0.99 and p(0.3) < 0.05
    with pytest.raises(ValueError, match="exceeds num_perm"):
        MinHashParams(num_perm=64, bands=16, rows_per_band=8)


def test_signature_batches_arrow_adapter(texts) -> None:
    import pyarrow as pa

    params = MinHashParams()
    batch = pa.RecordBatch.from_pydict({"doc_id": ["a", "b"], "text_hash": ["h1", "h2"], "text": texts[:2]})
    (out,) = list(signature_batches(params)([batch]))
    assert out.schema.field("signature").type == pa.list_(pa.int64())
    assert out.column("signature").to_pylist()[0] == signatures(texts[:1], params)[0].tolist()
    assert len(out.column("band_hashes").to_pylist()[1]) == params.bands
