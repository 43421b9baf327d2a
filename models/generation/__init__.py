"""LLM generation shared by teacher KD, mass synthesis and evaluation.

One interface, ``generate(requests) -> responses``, behind every backend (openai, openai-batch,
vllm, transformers); the request ledger wraps it for retries, budgets and exactly-once.
"""
