"""Pure functions (Python or DataFrame -> DataFrame) the Spark jobs compose; unit-tested alone."""
