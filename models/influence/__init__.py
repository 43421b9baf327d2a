"""LESS influence selection (Xia et al., arXiv 2402.04333) of the most valuable math texts.

JiuZhang3.0 spends its scarce teacher calls on the texts that LESS ranks highest for the
target tasks. The pipeline, one module per step:

1. ``data``      candidates (raw excerpt, or (prompt, generated problem–solution) pairs whose score
                 is attributed to the source text) and targets (GSM8K + MATH by subject, in the
                 training format, an equal count per subtask, ordered by subtask);
2. ``warmup``    LoRA warm-up on a seeded random fraction of the candidates, one checkpoint per
                 epoch with the Adam moments mapped to parameter names;
3. ``gradients`` per-example gradients of the LoRA parameters, computed in batches (one batched
                 backward + the LoRA factorisation, or ``torch.func`` ``vmap(grad)``), loss on
                 completion tokens only; candidates Adam-preconditioned, targets plain;
4. ``projection`` a seeded Rademacher projection to d dimensions, generated blockwise;
5. ``scoring``   Σ_ckpt w·cosine, mean within each target subtask, max over subtasks; top-k/fraction;
6. ``job``       the sharded job (prepare → score shards → commit) over the lake (``models.lake_io``);
7. ``cli``       ``jzlake influence`` / ``python -m models.influence``.
"""
