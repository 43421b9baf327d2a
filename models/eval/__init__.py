"""Evaluation in the CoT and tool settings, and the promotion gate (``jzlake eval``, ``jzlake promote``).

=============  ===================================================================================
spec.py        frozen benchmark specs (file sha256, prompt, decoding, extraction, grader) → spec hash
runner.py      generation (any backend, concurrent) + the tool loop through the sandbox + grading
metrics.py     accuracy with a seeded 95% bootstrap interval, failure rates, paired bootstrap
gate.py        the pure gate ``decide(challenger, champion, thresholds)`` and its MLflow side
job.py         ``jzlake eval``: load → generate → grade → gold.eval_predictions + MLflow; self-check
promote.py     ``jzlake promote NAME``: read metrics, decide, move the ``champion`` alias or refuse
=============  ===================================================================================

Grading is ``models/generation/answers.py`` (math-verify underneath), the same grader the
synthesis filter uses.
"""
