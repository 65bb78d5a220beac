"""Passkey retrieval grid (context length x depth) for dense / sinks+window / retrieval fp16|int8|int4.

    .venv/bin/python bench/passkey.py --lengths 2k,4k,8k,16k,32k --depths 0,0.25,0.5,0.75,1 --samples 1
    memserve bench passkey --lengths 4k --depths 0.5       # the same through the CLI
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from long_context_bench import main  # noqa: E402

if __name__ == "__main__":
    main("passkey")
