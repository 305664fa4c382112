"""The published tokenizer and the recipe that trains new ones."""

import json
import random

import pytest
from tokenizers import Tokenizer

from dual_lm.cli import main
from dual_lm.tokenizer import recipe_tokenizer, train_tokenizer
from dual_lm.tokens import SPECIAL_TOKENS

TRICKY = [
    "Hello world",
    "two\n\nparagraphs\nand a line",
    "runs   of    spaces and\ttabs",
    "unicode: naïve café, Ærøskøbing, 東京, emoji 🎉, Ελληνικά",
    "digits 3.14159 and 2026-11-28 and 1,000,000",
    "  leading spaces",
    "<mask> is a special token inside text",
]


@pytest.fixture(scope="module")
def published(tokenizer_51200):
    return Tokenizer.from_file(str(tokenizer_51200))


@pytest.mark.parametrize("text", TRICKY)
def test_published_tokenizer_round_trips(published, text):
    ids = published.encode(text).ids
    assert ids[0] == 1  # <s> prepended by the post-processor
    if "<mask>" in text:
        assert 4 in ids and "<mask>" in published.decode(ids, skip_special_tokens=False)
    else:
        assert published.decode(ids) == text


def test_published_tokenizer_drops_spaces_before_newlines(published):
    # the normaliser removes spaces before a newline, as the reference recipe does
    assert published.decode(published.encode("end   \nnext").ids) == "end\nnext"


def test_recipe_pipeline_equals_the_published_one(tokenizer_51200):
    ours = json.loads(recipe_tokenizer().to_str())
    ref = json.loads(tokenizer_51200.read_text())
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert ours[part] == ref[part], part


def test_trained_tokenizer_has_special_tokens_and_bos():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(50)) for _ in range(200)]
    tokenizer = train_tokenizer(iter(texts), vocab_size=400)
    assert tokenizer.get_vocab_size() == 400
    assert [tokenizer.id_to_token(i) for i in range(16)] == SPECIAL_TOKENS
    ids = tokenizer.encode("hello world").ids
    assert ids[0] == 1 and tokenizer.decode(ids) == "hello world"


def test_train_tokenizer_cli(tmp_path, capsys):
    corpus = tmp_path / "a.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": f"line {i} of text"}) for i in range(50)))
    out = tmp_path / "tok.json"
    assert (
        main(["train-tokenizer", "--input", str(corpus), "--text-field", "body", "--vocab-size", "300", str(out)]) == 0
    )
    assert Tokenizer.from_file(str(out)).get_vocab_size() <= 300
    assert main(["train-tokenizer", "--input", str(corpus), "--vocab-size", "100", str(tmp_path / "t.json")]) == 2
    assert "--vocab-size: must be >= 272, got 100" in capsys.readouterr().err


def test_train_tokenizer_on_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    out = tmp_path / "tok.json"
    assert main(["train-tokenizer", "--input", str(tmp_path / "empty.jsonl"), "--vocab-size", "300", str(out)]) == 2
    assert "no documents" in capsys.readouterr().err and not out.exists()
