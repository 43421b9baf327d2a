"""PySpark jobs: one module per job, each runnable with spark-submit and through ``jzlake``."""
