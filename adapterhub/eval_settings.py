"""What eval, compare and `eval --against` offer and assume: the metrics, their scores and the defaults.

Values only, no evaluation code: the CLI builds its options from these without importing what evaluates.
"""

from __future__ import annotations

from .training.data import SPLITS

METRICS = ("loss", "exact-match")
SCORES = {"loss": ("loss", "perplexity"), "exact-match": ("exact_match", "token_accuracy")}
# mlx_lm lora's defaults, so a score here and `mlx_lm lora --test` agree unless asked otherwise.
BATCH_SIZE = 4
MAX_SEQ_LENGTH = 2048
# Fidelity: prompts fuse checks on (a glance), prompts `eval --against` checks on, greedy tokens per prompt.
FUSE_PROMPTS = 4
AGAINST_PROMPTS = 16
FIDELITY_TOKENS = 8
# The share of positions whose greedy token may differ from base + adapter before `eval --against` fails. A
# float fuse differs only by rounding (float32: about 1e-6 of the logits' size, no token moves; bfloat16 may
# flip a near tie); re-quantizing a fused 4-bit model moves logits by tenths and flips tokens. Tokens, not
# logits, because how far logits may move without harm depends on the dtype and the model.
DEFAULT_TOLERANCE = 0.01

__all__ = ["SPLITS", "METRICS", "SCORES", "BATCH_SIZE", "MAX_SEQ_LENGTH", "FUSE_PROMPTS", "AGAINST_PROMPTS",
           "FIDELITY_TOKENS", "DEFAULT_TOLERANCE"]
