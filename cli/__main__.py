"""`python -m comfyui_lowbit.cli ...`: the `lowbit` command without its console script (scripts/gpu-check.sh
runs it this way on a checkout that is not installed)."""
import sys

from . import main

sys.exit(main())
