"""tools/eval.py: scoring on hand cases, readers on tiny fixtures, the runner with a fake answerer
(exact table, % of none, resumability), one-line errors; a real-model smoke run (``llm``)."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import InputError
from tools import eval as eval_cli
from tools.evaluation import scoring
from tools.evaluation.datasets import read_mme, read_textvqa, read_vizwiz
from tools.evaluation.easyvqa import WHEEL, easyvqa_wheel, read_easyvqa
from tools.evaluation.runner import ResultsFile, RunKey, plan_runs, run_eval
from tools.evaluation.tasks import get_task, mme_summary

SCORE_ATOL = 1e-12  # soft accuracies are sums of thirds over ten: exact up to float rounding


def _ten(**counts: int) -> list[str]:
    """Ten human answers, e.g. _ten(red=3, blue=7)."""
    out = [name for name, n in counts.items() for _ in range(n)]
    assert len(out) == 10
    return out


# --- scoring ------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("a dog.", "dog"), ("dont", "don't"), ("Don't", "don't"), ("The Cat!", "cat"),
    ("1,000", "1000"), ("3.5", "3.5"), ("none", "0"), ("yes.", "yes"), ("red/blue", "red blue"),
    ("  An\tapple\n", "apple"), ("what?", "what"), ("Dr. Pepper", "dr pepper"),
])
def test_normalize_answer_hand_cases(raw: str, expected: str) -> None:
    assert scoring.normalize_answer(raw) == expected


@pytest.mark.parametrize("agree, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_by_number_of_humans(agree: int, expected: float) -> None:
    # by hand: m agreeing humans -> (m·min(1, (m-1)/3) + (10-m)·min(1, m/3)) / 10
    answers = ["2"] * agree + ["3"] * (10 - agree)
    np.testing.assert_allclose(scoring.vqa_accuracy("Two", answers), expected, atol=SCORE_ATOL,
                               err_msg=f"{agree} of 10 humans gave the prediction")


def test_vqa_accuracy_normalises_both_sides_and_needs_answers() -> None:
    assert scoring.vqa_accuracy("the dog.", ["a dog"] * 10) == 1.0
    assert scoring.vqa_accuracy("dogs", ["dog"] * 10) == 0.0  # negative control: no stemming
    with pytest.raises(ValueError, match="at least one"):
        scoring.vqa_accuracy("x", [])


def _m4c_reference(prediction: str, answers: list[str]) -> float:
    """LLaVA's m4c evaluator: a score per unique answer over the 10 leave-one-out subsets."""
    norm = [scoring.normalize_answer(a) for a in answers]
    table = {}
    for unique in set(norm):
        accs = []
        for i in range(len(norm)):
            others = [a for j, a in enumerate(norm) if j != i]
            accs.append(min(1.0, sum(a == unique for a in others) / 3))
        table[unique] = sum(accs) / len(accs)
    return table.get(scoring.normalize_answer(prediction), 0.0)


def test_vqa_accuracy_matches_m4c_reference() -> None:
    rng = np.random.default_rng(0)
    vocab = ["2", "two", "red", "a red", "Red.", "blue", "dont", "don't", "yes"]
    for _ in range(300):
        answers = [str(w) for w in rng.choice(vocab, 10)]
        prediction = str(rng.choice(vocab))
        np.testing.assert_allclose(scoring.vqa_accuracy(prediction, answers), _m4c_reference(prediction, answers),
                                   atol=SCORE_ATOL, err_msg=f"{prediction!r} vs {answers}")


@given(st.text(max_size=30))
def test_normalize_answer_properties(text: str) -> None:
    out = scoring.normalize_answer(text)
    words = out.split()
    assert out == " ".join(words)
    assert not set(words) & set(scoring.ARTICLES)
    assert not set(words) & set(scoring.NUMBER_WORDS)


@given(st.lists(st.sampled_from(["a", "b", "c", "A.", "the b"]), min_size=10, max_size=10),
       st.sampled_from(["a", "b", "c", "d"]))
def test_vqa_accuracy_is_a_multiple_of_a_thirtieth(answers: list[str], prediction: str) -> None:
    score = scoring.vqa_accuracy(prediction, answers)
    assert 0.0 <= score <= 1.0
    np.testing.assert_allclose(score * 30, round(score * 30), atol=1e-9)


@pytest.mark.parametrize("raw, label", [
    ("Yes", "yes"), ("no", "no"), ("Yes, there is.", "yes"), ("No.", "no"), ("Not sure", "no"),
    ("  YES ", "yes"), ("maybe", "other"), ("", "other"),
])
def test_mme_label(raw: str, label: str) -> None:
    assert scoring.mme_label(raw) == label


def test_mme_acc_and_acc_plus_on_two_images() -> None:
    outcomes = [("existence", "a", 1.0), ("existence", "a", 1.0), ("existence", "b", 1.0), ("existence", "b", 0.0),
                ("code_reasoning", "c", 0.0), ("code_reasoning", "c", 1.0)]
    records = [{"group": g, "image_id": i, "score": s} for g, i, s in outcomes]
    result = scoring.mme_subtask([(r["image_id"], r["score"]) for r in records[:4]])
    assert (result.acc, result.acc_plus, result.questions, result.images) == (0.75, 0.5, 4, 2)
    assert result.score == 125.0
    # existence: 75 + 50; code_reasoning: 50 + 0
    assert mme_summary(records) == {"score": 175.0, "perception": 125.0, "cognition": 50.0}


def test_vizwiz_unanswerable_handling() -> None:
    unanswerable = ["unanswerable"] * 10
    for refusal in ("Unanswerable", "unanswerable.", "Unknown", "I don't know", ""):
        assert scoring.vizwiz_accuracy(refusal, unanswerable) == 1.0, refusal
    assert scoring.vizwiz_accuracy("red", unanswerable) == 0.0
    mixed = _ten(unanswerable=3, red=7)
    np.testing.assert_allclose(scoring.vizwiz_accuracy("cannot tell", mixed), 0.9, atol=SCORE_ATOL)
    assert scoring.vizwiz_accuracy("Red", mixed) == 1.0
    assert scoring.vqa_accuracy("unknown", unanswerable) == 0.0  # negative control: plain VQA has no mapping


def test_exact_accuracy() -> None:
    assert scoring.exact_accuracy("A circle.", ["circle"]) == 1.0
    assert scoring.exact_accuracy("circles", ["circle"]) == 0.0


# --- fixtures: tiny datasets ----------------------------------------------------------------
QUESTIONS = {"q1": ("what animal is it?", _ten(cat=10)),
             "q2": ("what colour is the car?", _ten(red=3, blue=7)),
             "q3": ("is it raining?", _ten(yes=2, no=8))}


def _image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


@pytest.fixture()
def textvqa(tmp_path: Path) -> Path:
    data = [{"question_id": int(qid[1:]), "image_id": f"img{qid}", "question": q, "answers": a, "extra": 1}
            for qid, (q, a) in QUESTIONS.items()]
    for i, entry in enumerate(data):
        _image(tmp_path / "train_images" / f"{entry['image_id']}.jpg", 40 * i)
    path = tmp_path / "TextVQA_0.5.1_val.json"
    path.write_text(json.dumps({"dataset_name": "textvqa", "data": data}), encoding="utf-8")
    return path


def test_read_textvqa(textvqa: Path) -> None:
    dataset = read_textvqa(textvqa)
    assert [i.question_id for i in dataset.items] == ["1", "2", "3"]
    first = dataset.items[0]
    assert (first.image_id, first.question, first.answers) == ("imgq1", "what animal is it?", tuple(["cat"] * 10))
    assert Path(first.image) == textvqa.parent / "train_images" / "imgq1.jpg"
    dataset.check_images()
    assert dataset.open_image(first).size == (40, 30)
    assert len(dataset.limited(2).items) == 2


def test_textvqa_bad_input(textvqa: Path, tmp_path: Path) -> None:
    (textvqa.parent / "train_images" / "imgq3.jpg").unlink()
    with pytest.raises(InputError, match="imgq3.jpg of question 3 not found"):
        read_textvqa(textvqa).check_images()
    read_textvqa(textvqa).limited(2).check_images()  # only the limited questions are checked
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(InputError, match="cannot parse"):
        read_textvqa(bad)
    bad.write_text(json.dumps({"data": [{"question_id": 1, "image_id": "x", "question": "q"}]}), encoding="utf-8")
    with pytest.raises(InputError, match="lacks 'answers'"):
        read_textvqa(bad)


def _mme_tree(root: Path) -> Path:
    """existence: flat (images and txt side by side); artwork: images/ + questions_answers_YN/."""
    _image(root / "existence" / "000000006040.jpg", 10)
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n", encoding="utf-8")
    _image(root / "artwork" / "images" / "10002.png", 90)
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Michelangelo? Please answer yes or no.\tNo\n\n"
        "Is this artwork created by Giotto? Please answer yes or no.\tYes\n", encoding="utf-8")
    (root / "notes").mkdir()
    return root


def test_read_mme_both_layouts(tmp_path: Path) -> None:
    dataset = read_mme(_mme_tree(tmp_path / "MME"))
    assert [(i.question_id, i.group, i.answers) for i in dataset.items] == [
        ("artwork/10002/0", "artwork", ("No",)), ("artwork/10002/1", "artwork", ("Yes",)),
        ("existence/000000006040/0", "existence", ("Yes",)), ("existence/000000006040/1", "existence", ("No",))]
    assert dataset.items[0].image_id == dataset.items[1].image_id == "artwork/10002"
    assert dataset.items[2].question == "Is there a train in this image? Please answer yes or no."
    dataset.check_images()
    assert len(read_mme(tmp_path / "MME" / "existence").items) == 2  # one subtask folder given directly


def test_mme_bad_input(tmp_path: Path) -> None:
    root = _mme_tree(tmp_path / "MME")
    (root / "existence" / "000000006040.txt").write_text("no tab here\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 1 is not"):
        read_mme(root)
    with pytest.raises(InputError, match="no MME subtask"):
        read_mme(root / "notes")


@pytest.fixture()
def vizwiz(tmp_path: Path) -> Path:
    entries = [
        {"image": "VizWiz_val_00000000.jpg", "question": "What is this?", "answerable": 1,
         "answers": [{"answer": a, "answer_confidence": "yes"} for a in _ten(soup=7, unanswerable=3)]},
        {"image": "VizWiz_val_00000001.jpg", "question": "What colour?", "answerable": 0,
         "answers": [{"answer": "unanswerable", "answer_confidence": "no"}] * 10},
    ]
    for i, entry in enumerate(entries):
        _image(tmp_path / "val" / entry["image"], 50 * i)
    path = tmp_path / "val.json"
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def test_read_vizwiz(vizwiz: Path) -> None:
    dataset = read_vizwiz(vizwiz)
    assert [(i.question_id, i.group) for i in dataset.items] == [
        ("VizWiz_val_00000000.jpg", "answerable"), ("VizWiz_val_00000001.jpg", "unanswerable")]
    assert Counter(dataset.items[0].answers) == Counter(soup=7, unanswerable=3)
    dataset.check_images()


def _fake_wheel(folder: Path, triples: list[list], images: int = 2) -> Path:
    """A zip with easy-vqa 1.0's member layout."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / WHEEL, "w") as archive:
        archive.writestr("easy_vqa/data/test/questions.json", json.dumps(triples))
        for i in range(images):
            buffer = io.BytesIO()
            Image.new("RGB", (64, 64), (255, 0, 0) if i == 0 else (0, 0, 255)).save(buffer, "PNG")
            archive.writestr(f"easy_vqa/data/test/images/{i}.png", buffer.getvalue())
    return folder / WHEEL


EASY = [["what is the red shape?", "circle", 0], ["is there a triangle?", "no", 0], ["what color is it?", "blue", 1]]


def test_read_easyvqa_from_wheel_and_download(tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "src", EASY)
    dataset = read_easyvqa(wheel)
    assert [(i.question_id, i.image_id, i.answers, i.group) for i in dataset.items] == [
        ("test/0", "test/0", ("circle",), "shape"), ("test/1", "test/0", ("no",), "yes/no"),
        ("test/2", "test/1", ("blue",), "color")]
    assert dataset.open_image(dataset.items[2]).getpixel((5, 5)) == (0, 0, 255)
    calls = []

    def download(folder: Path) -> None:
        calls.append(folder)
        shutil.copy(wheel, folder / WHEEL)

    cache = tmp_path / "cache"
    cache.mkdir()
    assert easyvqa_wheel(cache, download) == cache / WHEEL and calls == [cache]
    assert easyvqa_wheel(cache, download) == cache / WHEEL and calls == [cache]  # cached: no second download
    with pytest.raises(InputError, match="no easy-VQA data"):
        easyvqa_wheel(tmp_path / "missing", download)


def test_real_easyvqa_wheel() -> None:
    """The real easy-VQA test split, fetched with pip into ~/.cache/entroprune once (as the other real assets)."""
    try:
        wheel = easyvqa_wheel(None)  # the default cache; pip download --no-deps easy-vqa==1.0 when missing
    except InputError as err:
        pytest.skip(f"cannot fetch the easy-vqa wheel with pip: {err}")
    dataset = read_easyvqa(wheel)
    assert len(dataset.items) == 9673
    assert set(Counter(i.group for i in dataset.items)) == {"shape", "color", "yes/no"}
    assert dataset.open_image(dataset.items[0]).size == (64, 64)


# --- runner with a fake answerer ------------------------------------------------------------
PLAN = {  # (strategy, tokens) -> answers to q1, q2, q3
    ("none", 0): ("cat", "blue", "yes"),  # 1 + 1 + 0.6 -> 86.67
    ("entropy", 64): ("cat", "red", "yes"),  # 1 + 0.9 + 0.6 -> 83.33 = 96.2 % of none
    ("entropy", 128): ("Cat.", "blue", "yes"),  # as none -> 100.0 %
    ("uniform", 64): ("dog", "red", "no"),  # 0 + 0.9 + 1 -> 63.33 = 73.1 %
    ("uniform", 128): ("dog", "green", "maybe"),  # 0
}
EXPECTED_TABLE = """\
| strategy | K=64 | K=128 |
|---|---:|---:|
| none (all tokens) | 86.67 | 86.67 |
| entropy | 83.33 (96.2%) | 86.67 (100.0%) |
| uniform | 63.33 (73.1%) | 0.00 (0.0%) |"""
ARGS = ["--model", "unused", "--task", "textvqa", "--strategies", "none", "entropy", "uniform", "--tokens", "64", "128"]


class FakeAnswerer:
    """Answers from PLAN by (strategy, tokens) and the question's position; counts calls."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.fail_after = fail_after
        self.index = {q: i for i, (q, _) in enumerate(QUESTIONS.values())}

    def answer(self, image: Image.Image, question: str, strategy: str, tokens: int) -> str:
        if self.fail_after is not None and len(self.calls) == self.fail_after:
            raise RuntimeError("simulated crash")
        assert isinstance(image, Image.Image)
        text, instruction = question.split("\n")
        assert instruction == "Answer the question using a single word or phrase."
        self.calls.append((text, strategy, tokens))
        return PLAN[(strategy, tokens)][self.index[text]]


def _cli(monkeypatch, capsys, answerer: FakeAnswerer, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setattr(eval_cli, "real_answerer", lambda model, **kw: answerer)
    code = eval_cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _keys(path: Path) -> list[tuple]:
    return [tuple(json.loads(line)[k] for k in ("question_id", "strategy", "tokens"))
            for line in path.read_text(encoding="utf-8").splitlines()]


def test_table_and_relative_to_none(monkeypatch, capsys, textvqa: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    code, stdout, _ = _cli(monkeypatch, capsys, FakeAnswerer(), *ARGS, "--data", str(textvqa), "--out", str(out))
    assert code == 0
    assert EXPECTED_TABLE in stdout
    assert stdout.startswith("textvqa: 3 questions")
    keys = _keys(out)
    assert len(keys) == 15 and len(set(keys)) == 15  # 3 questions × (none once + 2 strategies × 2 budgets)
    line = json.loads(out.read_text(encoding="utf-8").splitlines()[1])
    assert line["strategy"] == "entropy" and line["tokens"] == 64 and line["prediction"] == "cat"
    assert line["task"] == "textvqa" and line["score"] == 1.0 and line["question"] == "what animal is it?"


def test_resume_after_truncation_evaluates_only_missing(monkeypatch, capsys, textvqa: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.jsonl"
    args = [*ARGS, "--data", str(textvqa), "--out", str(out)]
    assert _cli(monkeypatch, capsys, FakeAnswerer(), *args)[0] == 0
    full = out.read_text(encoding="utf-8").splitlines(keepends=True)
    k = 7
    out.write_text("".join(full[:k]) + full[k][:9], encoding="utf-8")  # k lines and a torn one
    again = FakeAnswerer()
    code, stdout, _ = _cli(monkeypatch, capsys, again, *args)
    assert code == 0 and EXPECTED_TABLE in stdout
    assert len(again.calls) == 15 - k
    assert sorted(_keys(out)) == sorted(set(_keys(out))) and len(_keys(out)) == 15
    assert _keys(out)[:k] == [tuple(json.loads(x)[f] for f in ("question_id", "strategy", "tokens")) for x in full[:k]]
    third = FakeAnswerer()
    assert _cli(monkeypatch, capsys, third, *args)[0] == 0 and third.calls == []  # nothing left to do


def test_crash_keeps_every_finished_line(textvqa: Path, tmp_path: Path) -> None:
    task, results = get_task("textvqa"), ResultsFile(tmp_path / "r.jsonl")
    dataset, runs = read_textvqa(textvqa), plan_runs(["none", "entropy"], [64, 128])
    with pytest.raises(RuntimeError, match="simulated"):
        run_eval(task, dataset, FakeAnswerer(fail_after=4), runs, results, progress=lambda _: None)
    assert len(results.load()) == 4
    resumed = FakeAnswerer()
    lines = run_eval(task, dataset, resumed, runs, results, progress=lambda _: None)
    assert len(resumed.calls) == 9 - 4 and len(lines) == 9
    assert RunKey("textvqa", "1", "none", 0) in lines


def test_plan_runs() -> None:
    assert [(r.strategy, r.tokens) for r in plan_runs(["none", "entropy", "none"], [64, 128, 64])] == [
        ("none", 0), ("entropy", 64), ("entropy", 128)]
    with pytest.raises(InputError, match="--tokens must be >= 1"):
        plan_runs(["entropy"], [0])


def test_mme_cli_tables(monkeypatch, capsys, tmp_path: Path) -> None:
    class YesMan:
        def answer(self, image: Image.Image, question: str, strategy: str, tokens: int) -> str:
            return "Yes" if strategy == "none" else "No"

    root = _mme_tree(tmp_path / "MME")
    code, stdout, _ = _cli(monkeypatch, capsys, YesMan(), "--model", "m", "--task", "mme", "--data", str(root),
                           "--strategies", "none", "uniform", "--tokens", "64", "--out", str(tmp_path / "r.jsonl"))
    assert code == 0
    # none answers Yes: each subtask has one of two right, no image fully right -> 50 + 50 = 100 in total
    assert "| none (all tokens) | 100.00 |" in stdout and "| uniform | 100.00 (100.0%) |" in stdout
    assert "mme / perception" in stdout and "mme / cognition" in stdout


# --- one-line errors ------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    (["--task", "textvqa", "--data", "/nonexistent/val.json"], "no data at /nonexistent/val.json"),
    (["--task", "gqa", "--data", "x"], "unknown task 'gqa'"),
    (["--task", "textvqa"], "--data is required"),
    (["--task", "textvqa", "--data", "BAD_JSON"], "cannot parse"),
    (["--task", "textvqa", "--data", "TEXTVQA", "--strategies", "magic"], "unknown strategy 'magic'"),
    (["--task", "textvqa", "--data", "TEXTVQA", "--limit", "0"], "--limit must be >= 1"),
    (["--task", "textvqa", "--data", "TEXTVQA", "--out", "BAD_RESULTS"], "line 1 is not a result line"),
])
def test_bad_input_is_one_line_exit_2(monkeypatch, capsys, textvqa: Path, tmp_path: Path,
                                      extra: list[str], message: str) -> None:
    bad_json, bad_results = tmp_path / "bad.json", tmp_path / "bad.jsonl"
    bad_json.write_text("{not json", encoding="utf-8")
    bad_results.write_text("{}\n", encoding="utf-8")
    swap = {"BAD_JSON": str(bad_json), "TEXTVQA": str(textvqa), "BAD_RESULTS": str(bad_results)}
    argv = ["--model", "m", "--out", str(tmp_path / "r.jsonl")] + [swap.get(a, a) for a in extra]
    code, stdout, stderr = _cli(monkeypatch, capsys, FakeAnswerer(), *argv)
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr


# --- the real answerer on the tiny model (llama.cpp) ------------------------------------------
@pytest.mark.llm
def test_cli_smoke_with_real_answerer(tiny_llm_bundle: Path, tmp_path: Path, capsys) -> None:
    wheel = _fake_wheel(tmp_path / "easy", EASY)
    out = tmp_path / "results.jsonl"
    argv = ["--model", str(tiny_llm_bundle), "--task", "easyvqa", "--data", str(wheel), "--strategies", "none",
            "entropy", "entropyprune", "--tokens", "16", "64", "--out", str(out), "--max-tokens", "4"]
    assert eval_cli.main(argv) == 0
    stdout = capsys.readouterr().out
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 3 * 5  # random weights: answers are noise, but every run must produce a line
    assert all(isinstance(x["prediction"], str) and 0.0 <= x["score"] <= 1.0 for x in lines)
    assert "| entropyprune |" in stdout and "easyvqa / shape" in stdout
