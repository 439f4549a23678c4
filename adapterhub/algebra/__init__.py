"""Tensor algebra over adapters and models: fuse, unfuse, stack, extract — streamed, one tensor at a time."""
