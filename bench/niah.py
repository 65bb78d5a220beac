"""RULER-style needle-in-a-haystack grid: --task niah_single (default) | niah_multikey |
niah_multivalue | variable_tracking, context length x depth, same methods as bench/passkey.py.

    .venv/bin/python bench/niah.py --task niah_multikey --lengths 4k,16k --depths 0,0.5,1
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from long_context_bench import main  # noqa: E402

if __name__ == "__main__":
    main("niah_single")
