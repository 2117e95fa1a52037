"""Tools run from the repository root (python -m tools.NAME): the benchmark of a training step and
of the data loader (bench), checking a dataset (check_data) and re-encoding it for fast sampling
(prepare_data)."""
