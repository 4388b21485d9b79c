"""inference stage of the pipeline."""
