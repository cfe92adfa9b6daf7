"""`python -m comfyui_lowbit.cli ...`: the `lowbit` command (scripts/gpu-check.sh runs it this way)."""
import sys

from . import main

sys.exit(main())
