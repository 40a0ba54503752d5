"""10,000 classes: the predictor and the output files work within a bounded memory (tiny model
at a small geometry, in a child process whose peak RSS is measured)."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSES = 10_000
BOUND_MB = 600  # peak RSS over the built model's: measured ~365 MB (outputs ~120 MB each, text, activations)

CHILD = r"""
import json, resource, sys
from pathlib import Path
import numpy as np
from catseg import OpenVocabPredictor
from catseg.app.outputs import write_outputs
small = ["MODEL.BACKBONE_RESOLUTION", "(64, 64)", "MODEL.SEM_SEG_HEAD.CLIP_RESOLUTION", "(64, 64)",
         "MODEL.SEM_SEG_HEAD.FEATURE_RESOLUTION", "[4, 4]", "MODEL.SEM_SEG_HEAD.WINDOW_SIZES", "2",
         "MODEL.SWIN.WINDOW_SIZE", "4", "MODEL.SEM_SEG_HEAD.PROMPT_ENSEMBLE_TYPE", "single",
         "MODEL.SEM_SEG_HEAD.TEXT_CACHE", "False", "MODEL.DEVICE", "cpu"]
predictor = OpenVocabPredictor("configs/tiny.yaml", opts=small)
built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
result = predictor.predict(image, [f"class number {i}" for i in range(int(sys.argv[2]))])
record = write_outputs(result, Path("random.png"), Path(sys.argv[1]), "random", "tiny.yaml", "")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"growth_mb": peak - built, "classes": len(result.classes), "present": len(record["present"])}))
"""


def test_ten_thousand_classes_within_memory_bound(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(CLASSES)], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["classes"] == CLASSES and report["growth_mb"] < BOUND_MB, report
    record = json.loads((tmp_path / "random.json").read_text())
    assert record["label_dtype"] == "uint16" and len(record["classes"]) == CLASSES
    from PIL import Image
    overlay = Image.open(tmp_path / record["overlay"])
    assert overlay.height <= 48 * 40 and overlay.width < 64 + 1000  # the legend stays bounded (40 rows)
