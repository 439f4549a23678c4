"""The bundled MLX trainer: runs, checkpoints and their retention, exact resume."""
