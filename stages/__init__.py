"""One module per DVC stage: `python -m stages.NAME` (`--help` on each)."""
