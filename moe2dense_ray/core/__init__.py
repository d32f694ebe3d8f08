"""What every stage uses: the table of model families, checkpoint and storage I/O (fsspec), the
source checkpoint, strict model loading, text blocks, teacher hosting on Ray, the Ray session,
the typed configs, progress, result tables and plots. Nothing here imports a stage."""
