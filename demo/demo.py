"""Segment image files with your own class names; same as the `catseg-demo` console script.

    .venv/bin/python demo/demo.py --input demo/samples --output output/demo --vocab "sky; grass; house, building; sun"

Options, outputs and the JSON schema: catseg/app/cli.py and catseg/app/outputs.py (or demo/README.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from catseg.app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
