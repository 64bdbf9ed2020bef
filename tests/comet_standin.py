"""A tiny COMET checkpoint built offline: a RegressionMetric on a 2-layer XLM-R whose SentencePiece vocabulary is
trained on shipped FLORES text, saved as a COMET checkpoint folder, with the scores the very model that was saved
gives to some sample sets (the independent reference for ladm's COMET paths). Runs where unbabel-comet is installed:
imported by the tests, or as `python tests/comet_standin.py ROOT SAMPLES.json` (writes ROOT/reference.json)."""

import json
import sys
from pathlib import Path

FLORES_EN = Path(__file__).resolve().parents[1] / "data" / "flores200" / "dev" / "eng_Latn.dev"


def build(root: Path, sample_sets: dict[str, list[dict]]) -> dict[str, dict]:
    """ROOT/tiny-comet (hparams.yaml + checkpoints/model.ckpt); returns {set: {"system", "scores"}}."""
    import pytorch_lightning
    import sentencepiece
    import torch
    import yaml
    from comet.models import RegressionMetric
    from transformers import XLMRobertaConfig, XLMRobertaTokenizerFast

    encoder_dir = root / "encoder"
    sentencepiece.SentencePieceTrainer.train(input=str(FLORES_EN), model_prefix=str(root / "xlmr"), vocab_size=500,
                                             minloglevel=2)
    XLMRobertaTokenizerFast(vocab_file=str(root / "xlmr.model")).save_pretrained(encoder_dir)
    XLMRobertaConfig(vocab_size=504, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=130).save_pretrained(encoder_dir)
    torch.manual_seed(0)
    model = RegressionMetric(pretrained_model=str(encoder_dir), load_pretrained_weights=False,
                             local_files_only=True, hidden_sizes=[16])
    checkpoint_dir = root / "tiny-comet"
    (checkpoint_dir / "checkpoints").mkdir(parents=True)
    hparams = dict(model.hparams) | {"class_identifier": "regression_metric"}
    (checkpoint_dir / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pytorch_lightning.__version__},
               checkpoint_dir / "checkpoints" / "model.ckpt")
    reference = {}
    for name, samples in sample_sets.items():
        output = model.predict(samples, batch_size=2, gpus=0, num_workers=0, progress_bar=False)
        reference[name] = {"system": float(output.system_score), "scores": [float(s) for s in output.scores]}
    return reference


if __name__ == "__main__":
    root, samples = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))
    (root / "reference.json").write_text(json.dumps(build(root, samples)), encoding="utf-8")
