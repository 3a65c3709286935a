"""Preference data for GenRM training: HelpSteer3 conversion, the shipped set, the environment's reward."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from pathlib import Path

import pytest

from posttrain.environments.base import Sample, score_safely
from posttrain.environments.check import check_environment
from posttrain.environments.data import DataError
from posttrain.environments.registry import load_environment
from posttrain.genrm.judge_format import FALLBACK, Judgement, parse_judgement
from posttrain.genrm.preference_data import PreferencePair, load_pairs, ranking_from_preference, shipped_folder, swapped
from posttrain.genrm.preference_env import PreferenceEnv, grade, preference_metrics

ENV = "posttrain.genrm.preference_env:PreferenceEnv"
ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_TOKENIZER = Path("~/.cache/posttrain/models/smollm2-135m-instruct/tokenizer.json").expanduser()


def user(text):
    return {"role": "user", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


HS3_ROWS = [
    {"domain": "general", "language": "english", "overall_preference": -2,
     "context": [user("Hi"), {"role": "assistant", "content": "Hello!"}, user("What is 2 + 2?")],
     "response1": "4", "response2": "5",
     "individual_preference": [{"score": -2, "reasoning": "@Response 1 is better than @Response 2."}]},
    {"context": [user("Name a fruit.")], "response1": "Car.", "response2": "Apple.", "overall_preference": 3,
     "feedback1": ["The response is slightly helpful. It names a car.", "The response is partially helpful."],
     "feedback2": ["The response is perfectly helpful."]},
    {"context": [user("Say hi.")], "response1": "Hi!", "response2": "Hello!", "overall_preference": 0},
    {"context": [user("Capital of Peru?")], "response1": "Lima.", "response2": "Lima, I think.",
     "overall_preference": -1, "helpfulness_1": 4, "helpfulness_2": 2},
]


def test_overall_preference_maps_onto_the_six_point_ranking():
    assert [ranking_from_preference(p) for p in (-3, -2, -1, 1, 2, 3)] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert ranking_from_preference(0) is None
    with pytest.raises(ValueError, match="-3..3"):
        ranking_from_preference(4)


def test_loads_helpsteer3_jsonl_with_labelled_feedback_and_derived_helpfulness(tmp_path):
    path = write_jsonl(tmp_path / "hs3.jsonl", HS3_ROWS)
    pairs = load_pairs(path, "train")
    assert [p.id for p in pairs] == ["0", "1", "3"]  # row 2 is a tie: dropped by default
    first, second, third = pairs
    assert first.context[-1] == user("What is 2 + 2?") and len(first.context) == 3
    # no helpfulness in the row: 3 +- |(-2)|/2, the preferred (first) side up
    assert (first.score_1, first.score_2, first.ranking, first.scores_derived) == (4.0, 2.0, 2.0, True)
    assert first.category == "general"
    # feedback "slightly" (2) and "partially" (3) average 2.5; "perfectly" is 5
    assert (second.score_1, second.score_2, second.ranking, second.scores_derived) == (2.5, 5.0, 6.0, False)
    assert (third.score_1, third.score_2, third.ranking) == (4.0, 2.0, 3.0)
    tie = load_pairs(path, "train", ties="midpoint")[2]
    assert (tie.id, tie.score_1, tie.score_2, tie.ranking) == ("2", 3.0, 3.0, 3.5)


def test_loads_reference_genrm_rows_and_plain_string_context(tmp_path):
    path = write_jsonl(tmp_path / "genrm.jsonl", [
        {"id": "a", "context": "Pick a colour.", "response1": "Blue.", "response2": "No.", "preference_ranking": 5},
    ])
    (pair,) = load_pairs(path, "train")
    assert pair.context == [user("Pick a colour.")]
    # ranking 5 = "response 2 better" = overall_preference 2: derived 2 / 4
    assert (pair.id, pair.score_1, pair.score_2, pair.ranking) == ("a", 2.0, 4.0, 5.0)


def test_loads_a_parquet_folder_and_serves_validation_as_test(tmp_path):
    import datasets

    folder = tmp_path / "hs3"
    folder.mkdir()
    later = {**HS3_ROWS[3], "response1": "Quito.", "overall_preference": 2, "helpfulness_1": 1, "helpfulness_2": 4}
    datasets.Dataset.from_list([HS3_ROWS[3], later]).to_parquet(str(folder / "train.parquet"))
    datasets.Dataset.from_list([HS3_ROWS[3]]).to_parquet(str(folder / "validation.parquet"))
    train = load_pairs(str(folder), "train")
    assert [(p.response_1, p.score_1, p.ranking) for p in train] == [("Lima.", 4.0, 3.0), ("Quito.", 1.0, 5.0)]
    (test,) = load_pairs(str(folder), "test")
    assert (test.response_2, test.score_1, test.score_2) == ("Lima, I think.", 4.0, 2.0)


def test_bad_rows_are_reported_by_row_and_field(tmp_path, caplog):
    good = HS3_ROWS[3]
    path = write_jsonl(tmp_path / "bad.jsonl", [
        good,
        {**good, "response2": None},
        {**good, "context": [user("hi"), {"role": "assistant", "content": "yo"}]},
        {**good, "overall_preference": 5},
        {**good, "helpfulness_1": 7},
        {**good, "context": [{"role": "bot", "content": "hi"}]},
    ])
    with caplog.at_level(logging.WARNING):
        assert len(load_pairs(path, "train")) == 1
    log = caplog.text
    assert "5 invalid row(s)" in log
    assert "row 1: field 'response2' is missing" in log
    assert "row 2: field 'context' ends with a 'assistant' turn" in log
    assert "row 3: field 'overall_preference' is int 5, expected an integer in -3..3" in log
    assert "row 4: field 'helpfulness_1' is int 7, expected a number in 1..5" in log
    assert "row 5: field 'context' message 0 has role 'bot'" in log
    with pytest.raises(DataError, match="row 1: field 'response2'"):
        load_pairs(path, "train", on_invalid="error")


def test_swapping_the_order_mirrors_the_labels():
    pair = PreferencePair("x", [user("q")], "good", "bad", 5.0, 2.0, 2.0)
    other = swapped(pair)
    assert (other.response_1, other.response_2, other.score_1, other.score_2, other.ranking) == \
        ("bad", "good", 2.0, 5.0, 5.0)


def run_score(env, sample, completion):
    return asyncio.run(score_safely(env, sample, completion))


def test_environment_gold_scores_one_and_garbage_zero():
    env = load_environment(ENV)
    report = check_environment(env, n=8)
    assert report.ok, "\n".join(report.lines())
    sample = env.samples("test", 0)[0]
    gold = run_score(env, sample, "Both are fine, but...\n" + env.gold_answer(sample))
    assert gold.reward == 1.0 and gold.kind == "ok" and gold.metrics["raw_reward"] == 0.0
    garbage = run_score(env, sample, "I think response 1 is better.")
    assert garbage.reward == 0.0 and garbage.kind == "invalid" and garbage.error == "format: no_json"
    assert garbage.metrics["raw_reward"] == -23.0 and garbage.metrics["format_error"] == 1.0


def test_partial_errors_are_worked_by_hand():
    env = PreferenceEnv()
    sample = Sample("s", [user("q")], answer={"score_1": 4.0, "score_2": 2.0, "ranking": 2.0})
    score = run_score(env, sample, 'Response 1 is right. {"score_1": 5, "score_2": 2, "ranking": 3}')
    # |5-4| + |2-2| + |3-2| = 2 -> R = -2 -> 1 - 2/23
    assert score.metrics["raw_reward"] == -2.0
    assert score.reward == pytest.approx(21 / 23)
    assert (score.metrics["abs_error_score_1"], score.metrics["abs_error_score_2"],
            score.metrics["abs_error_ranking"]) == (1.0, 0.0, 1.0)
    assert score.metrics["pairwise_correct"] == 1.0 and score.metrics["format_error"] == 0.0
    wrong_side = run_score(env, sample, '{"score_1": 2, "score_2": 4, "ranking": 5}')
    assert wrong_side.metrics["raw_reward"] == -7.0 and wrong_side.metrics["pairwise_correct"] == 0.0
    assert wrong_side.reward == pytest.approx(16 / 23)
    tie = run_score(env, sample, '{"score_1": 3, "score_2": 3, "ranking": 3.5}')
    assert tie.metrics["pairwise_correct"] == 0.5
    worst = grade({"score_1": 5.0, "score_2": 1.0, "ranking": 1.0}, Judgement(1.0, 5.0, 6.0, parsed=True))
    assert (worst.raw_reward, worst.reward) == (-13.0, pytest.approx(10 / 23))
    label_tie = run_score(env, Sample("t", [user("q")], answer={"score_1": 3, "score_2": 3, "ranking": 3.5}),
                          '{"score_1": 3, "score_2": 3, "ranking": 4}')
    assert "pairwise_correct" not in label_tie.metrics  # a tied label has no side to pick


def test_preference_metrics_by_hand():
    pairs = [PreferencePair("a", [user("q")], "r1", "r2", 5.0, 1.0, 1.0, category="math"),
             PreferencePair("b", [user("q")], "r1", "r2", 2.0, 4.0, 5.0, category="code"),
             PreferencePair("c", [user("q")], "r1", "r2", 3.0, 3.0, 3.5, category="math")]
    judgements = [parse_judgement('{"score_1": 5, "score_2": 1, "ranking": 2}'), FALLBACK,
                  Judgement(4.0, 3.0, 3.0, parsed=True)]
    m = preference_metrics(pairs, judgements)
    assert (m["n_judgements"], m["n_readable"], m["n_decided"]) == (3, 2, 1)
    assert m["pairwise_accuracy"] == 1.0  # "a": the right side; "b" unreadable decides nothing; "c" is a tied label
    assert m["chance_accuracy"] == 0.5 and m["first_side_accuracy"] == 0.5
    assert m["format_error_rate"] == pytest.approx(1 / 3)
    assert m["mae_score_1"] == pytest.approx(2 / 3) and m["mae_score_2"] == pytest.approx(1 / 3)
    assert m["mae_ranking"] == pytest.approx(1.0)  # (1 + 1.5 + 0.5) / 3
    assert m["mean_raw_reward"] == pytest.approx(-8.5)  # (-1 - 23 - 1.5) / 3
    assert m["mean_reward"] == pytest.approx(14.5 / 23)  # (22/23 + 0 + 21.5/23) / 3
    assert m["pairwise_accuracy/math"] == 1.0 and "pairwise_accuracy/code" not in m  # "c" (a tie) left out
    with pytest.raises(ValueError, match="3 pairs but 2 judgements"):
        preference_metrics(pairs, judgements[:2])
    unreadable = preference_metrics(pairs[:2], [FALLBACK, FALLBACK])
    assert "pairwise_accuracy" not in unreadable and unreadable["format_error_rate"] == 1.0  # no figure from nothing


def test_environment_options():
    env = PreferenceEnv(size=5, test_size=3, both_orders=True, system="Be strict.")
    train, test = env.samples("train", 0), env.samples("test", 1)
    assert len(train) == 10 and len(test) == 6
    assert not {s.id for s in train} & {s.id for s in test}
    assert train[0].messages[0] == {"role": "system", "content": "Be strict."}
    assert train[1].answer["ranking"] == 7 - train[0].answer["ranking"]
    assert train[1].id == train[0].id + "/swapped"
    with pytest.raises(ValueError, match="split"):
        env.samples("validation", 0)
    compact = PreferenceEnv(size=1, prompt_style="compact").samples("train", 0)[0].messages[1]["content"]
    assert compact.startswith("Rate two responses") and compact != train[0].messages[1]["content"]
    for bad in ({"size": 0}, {"ties": "drop"}, {"on_invalid": "ignore"}, {"prompt_style": "terse"}):
        with pytest.raises(ValueError):
            PreferenceEnv(**bad)


def test_shipped_set_is_balanced_short_and_consistent():
    for split, n in (("train", 600), ("test", 200)):
        pairs = load_pairs(split=split, on_invalid="error")
        assert len(pairs) == n
        better_first = sum(p.ranking < 3.5 for p in pairs) / n
        assert 0.4 <= better_first <= 0.6
        for p in pairs:
            assert not p.scores_derived
            assert (p.score_1 > p.score_2) == (p.ranking < 3.5)  # rubric: the preferred side has more help
            assert max(len(p.response_1.split()), len(p.response_2.split())) < 60
    train_keys = {json.dumps([p.context, sorted([p.response_1, p.response_2])]) for p in load_pairs(split="train")}
    test_keys = {json.dumps([p.context, sorted([p.response_1, p.response_2])]) for p in load_pairs(split="test")}
    assert len(train_keys) == 600 and len(test_keys) == 200 and not train_keys & test_keys


def test_shipped_judging_prompts_are_short():
    env = PreferenceEnv()
    texts = ["\n".join(m["content"] for m in s.messages) for split in ("train", "test") for s in env.samples(split, 0)]
    if SMOLLM2_TOKENIZER.is_file():  # the SmolLM2 tokenizer itself (the `tokenizers` file loads in < 1 s)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(SMOLLM2_TOKENIZER))
        longest = max(len(tok.encode(t).ids) for t in texts)
        assert longest + 32 < 512, longest  # 32: chat-template markup around the two messages
    else:
        assert max(len(t) for t in texts) < 1700


def test_generator_reproduces_the_shipped_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_preference_data", ROOT / "scripts/make_preference_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path)]) == 0
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (shipped_folder() / f"{split}.jsonl").read_bytes()


def test_held_out_evaluation_reports_pairwise_accuracy():
    from types import SimpleNamespace

    from posttrain.config import GenerationConfig
    from posttrain.rlvr.evaluate import evaluate

    env = PreferenceEnv(test_size=2, both_orders=True)
    gold = {s.messages[1]["content"]: PreferenceEnv.gold_answer(s) for s in env.samples("test", 0)}

    class FirstRightThenWrong:  # the gold answer for the first sample, "response 1 much better" for the rest
        def generate(self, prompts, gen, n):
            assert gen.temperature == 0.0 and n == 1
            texts = [gold[p[1]["content"]] if i == 0 else '{"score_1": 5, "score_2": 1, "ranking": 1}'
                     for i, p in enumerate(prompts)]
            return [[SimpleNamespace(answer=t, reasoning=None)] for t in texts]

    judge = GenerationConfig(enable_thinking=False)
    out = evaluate(FirstRightThenWrong(), {"genrm_preference": env}, judge, n_prompts=4, seed=0)
    first_side = [s.answer["ranking"] < 3.5 for s in env.samples("test", 0)]
    expected = (1 + sum(first_side[1:])) / 4
    assert out["eval/genrm_preference/pairwise_correct"] == expected
    assert out["eval/genrm_preference/format_error"] == 0.0 and out["eval/genrm_preference/prompts"] == 4
