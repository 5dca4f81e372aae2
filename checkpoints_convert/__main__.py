"""``python -m checkpoints_convert {hf-to-megatron,megatron-to-hf,verify} ...``"""

import sys

from checkpoints_convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
