"""planning stage of the pipeline."""
