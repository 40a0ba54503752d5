"""The web demo (Gradio, on 127.0.0.1); same as the `catseg-web` console script.

    .venv/bin/python demo/app.py --config-file configs/vitl_swinb_384.yaml --weights model_final.pth

Options and behaviour: catseg/web_demo.py (or demo/README.md).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout without installing

from catseg.app.web import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
