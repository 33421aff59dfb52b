"""Read models derived from the log: the projection (events -> execution state) and retention."""
