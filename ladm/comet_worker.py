"""The COMET worker (METHODS.md §5, metrics): scores (src, mt, ref) triples with one COMET checkpoint, in the
environment that has unbabel-comet (its last release needs transformers < 5 and numpy < 2: `make install` builds
`.venv-comet`), for a ladm process on a newer stack. Standalone: it imports neither ladm nor anything but COMET,
so any Python with unbabel-comet 2.2.x runs it by its file path.

    <comet python> comet_worker.py REQUEST.json RESPONSE.json

REQUEST: {"checkpoint": <folder>/checkpoints/model.ckpt, "batch_size": int, "device": "auto"|"cpu"|"cuda",
"samples": [{"src", "mt", "ref"}, ...]}. RESPONSE (written when every score exists): {"scores": [...]}, one
segment score per sample, in order.
"""

import json
import os
import sys


def main(argv: list[str]) -> None:
    request_path, response_path = argv
    with open(request_path, encoding="utf-8") as f:
        request = json.load(f)
    import torch
    from comet import load_from_checkpoint

    model = load_from_checkpoint(request["checkpoint"], local_files_only=True)
    device = request.get("device", "auto")
    gpus = 1 if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else 0
    output = model.predict(request["samples"], batch_size=request["batch_size"], gpus=gpus, num_workers=0,
                           progress_bar=True)
    tmp = f"{response_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"scores": [float(s) for s in output.scores]}, f)
    os.replace(tmp, response_path)


if __name__ == "__main__":
    main(sys.argv[1:])
