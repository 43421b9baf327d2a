"""JiuZhang Lake: the shared core every stage imports (no pyspark/torch at import time)."""

__version__ = "0.1.0"
