"""Label a collection of images or a video; same as the `catseg-label` console script.

    .venv/bin/python demo/label.py --input demo/samples --output output/labelled --vocab "sky; grass; house; sun"

Options, launcher flags (--num-gpus ...), resuming and the output folder: catseg/app/label.py.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from catseg.app.label import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
