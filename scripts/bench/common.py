"""What every phase family shares: sizes of the generated data, the vocabulary size the parent sets, paths."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

# Spawned phases read the vocabulary size from the environment `main` sets (--vocab).
VOCAB_SIZE = int(os.environ.get("CAPTIONER_BENCHMARK_VOCAB", "5000"))
MAX_LENGTH = 34
COCO_MEAN_WORDS, COCO_SD_WORDS = 10.5, 2.4
