"""A run's directory (local, gs:// or s3://): what it holds and under which names (layout), the
config it was started with and what a resume must keep (identity), the checks of its hosts
(hosts), the compilation cache (cache), the metrics files (metrics), and reading its
checkpoints (checkpoints)."""
