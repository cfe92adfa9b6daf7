"""`lowbit` without installing the package (the GPU check runs a copied checkout): python scripts/lowbit.py ARGS."""
import sys

from comfyui_lowbit.cli import main

sys.exit(main())
