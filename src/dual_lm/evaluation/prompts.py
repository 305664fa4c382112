"""lm-evaluation-harness's standard zero-shot formats (lm_eval 0.4.13 task YAMLs), one function per task.

Each function takes a dataset row and returns an ``Item``: the context, the choice texts, and the gold
index. A request is (context, " " + choice): lm-eval's default target delimiter is one space.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TARGET_DELIMITER = " "
LETTERS = "ABCDE"


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    gold: int
    subtask: str = ""


def arc(row: dict) -> Item:
    """``Question: {question}\\nAnswer:`` -> each choice text; gold from ``answerKey`` among the labels."""
    labels = list(row["choices"]["label"])
    return Item(f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]), labels.index(row["answerKey"]))


def hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag cleanup: strip, `` [title]`` -> ``. ``, drop ``[...]`` tags, collapse double spaces once."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(row: dict) -> Item:
    """``{activity_label}: {ctx_a} {Ctx_b}`` (cleaned) -> each cleaned ending."""
    context = hellaswag_clean(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
    return Item(context, tuple(hellaswag_clean(e) for e in row["endings"]), int(row["label"]))


def piqa(row: dict) -> Item:
    """``Question: {goal}\\nAnswer:`` -> sol1 | sol2."""
    return Item(f"Question: {row['goal']}\nAnswer:", (row["sol1"], row["sol2"]), int(row["label"]))


def openbookqa(row: dict) -> Item:
    """The bare ``question_stem`` -> each choice text."""
    labels = list(row["choices"]["label"])
    return Item(row["question_stem"], tuple(row["choices"]["text"]), labels.index(row["answerKey"].lstrip()))


def siqa(row: dict) -> Item:
    """``Q: {context} {question}\\nA:`` -> answerA | answerB | answerC; gold = label - 1."""
    answers = (row["answerA"], row["answerB"], row["answerC"])
    return Item(f"Q: {row['context']} {row['question']}\nA:", answers, int(row["label"]) - 1)


def commonsense_qa(row: dict) -> Item:
    """``Question: {question}\\nA. ..\\nE. ..\\nAnswer:`` -> the letters A-E."""
    texts = row["choices"]["text"]
    lines = [f"Question: {row['question'].strip()}"] + [f"{LETTERS[i]}. {t}" for i, t in enumerate(texts)]
    letters = tuple(LETTERS[: len(texts)])
    return Item("\n".join([*lines, "Answer:"]), letters, letters.index(row["answerKey"]))


def mmlu(row: dict, subject: str) -> Item:
    """The subject line, then ``{question}\\nA. ..\\nD. ..\\nAnswer:`` -> the letters A-D."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    options = [f"{LETTERS[i]}. {c}" for i, c in enumerate(row["choices"])]
    context = header + "\n".join([row["question"].strip(), *options, "Answer:"])
    return Item(context, tuple(LETTERS[: len(row["choices"])]), int(row["answer"]), subject)


def blimp(row: dict) -> Item:
    """An empty context -> sentence_good | sentence_bad; gold 0 (the model should prefer the good one)."""
    return Item("", (row["sentence_good"], row["sentence_bad"]), 0, row.get("UID", ""))
