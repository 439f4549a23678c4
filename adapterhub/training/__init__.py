"""The bundled MLX trainer: runs, checkpoints and their retention, exact resume, data-parallel under mlx.launch."""
