"""Training: the synthesizer (KD fine-tuning) and the JiuZhang model (CPT then SFT), one core.

* ``data.py``      — samples (loss on targets only, EOS appended), packing with position ids that
  restart per sample (attention kept inside each sample), padded baseline, source readers;
* ``schedule.py``  — the WSD learning-rate schedule (warm-up 3%, stable to 85%, decay to 0.1×);
* ``loop.py``      — the ``accelerate`` loop: fixed data order, gradient accumulation, checkpoints
  (safetensors + optimizer/scheduler/RNG + data position) and resume;
* ``job.py``       — preflight checks, training key, MLflow run, registration (``models/registry.py``);
* ``synthesizer.py`` / ``jiuzhang.py`` — each job's inputs (pinned Delta versions) and ``main``;
* ``cli.py``       — ``jzlake train synthesizer|jiuzhang``; ``dispatch.py`` — ``GpuJobSpec``s.
"""
