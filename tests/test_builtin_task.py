"""Tests of the built-in synthetic task (rlhf_ds/data/builtin_task.py)."""

import json
import math
import os
from collections import Counter

import numpy as np
import pytest

from rlhf_ds.data import builtin_task as bt
from rlhf_ds.data.builtin_task import CATEGORY_OF, BuiltinTask, gold_reward_fn, tokenize

FOX = "human : describe the red fox . assistant :"
BOAT = "human : talk about the boat . assistant :"


@pytest.fixture(scope="module")
def task():
    return BuiltinTask(0)


@pytest.fixture(scope="module")
def pref_train(task):
    return task.preference_rows(3000)


@pytest.fixture(scope="module")
def pref_heldout(task):
    return task.preference_rows(1500, split="eval")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    return BuiltinTask(0).write(str(out)), out


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


# ---------------------------------------------------------------- determinism


def test_same_seed_same_data_different_seed_different_data():
    a, b, c = BuiltinTask(0), BuiltinTask(0), BuiltinTask(1)
    assert a.sft_rows(50) == b.sft_rows(50)
    assert a.preference_rows(50) == b.preference_rows(50)
    assert a.pretrain_corpus(20) == b.pretrain_corpus(20)
    assert a.eval_prompts(30) == b.eval_prompts(30)
    assert a.sft_rows(50) != c.sft_rows(50)
    assert a.preference_rows(50) != c.preference_rows(50)
    assert a.eval_prompt_set != c.eval_prompt_set
    # the hidden valence is part of the world: it changes with the seed
    assert a.pleasant_words() != c.pleasant_words()
    # a smaller draw is a prefix of a larger one
    assert a.sft_rows(10) == a.sft_rows(50)[:10]


def test_write_is_byte_identical_per_seed(tmp_path):
    sizes = {"pretrain": 200, "sft_train": 100, "sft_eval": 20, "pref_train": 100, "pref_eval": 20,
             "ppo_prompts": 64, "eval_prompts": 32}
    p1 = BuiltinTask(3).write(str(tmp_path / "a"), sizes)
    p2 = BuiltinTask(3).write(str(tmp_path / "b"), sizes)
    p3 = BuiltinTask(4).write(str(tmp_path / "c"), sizes)
    for name in p1:
        with open(p1[name], "rb") as f1, open(p2[name], "rb") as f2:
            assert f1.read() == f2.read(), name
    with open(p1["sft_train"], "rb") as f1, open(p3["sft_train"], "rb") as f3:
        assert f1.read() != f3.read()


# ---------------------------------------------------------------- prompts and text shape


def test_eval_prompts_disjoint_from_training_prompts(task, pref_train, written):
    paths, _ = written
    train_split = set(task.train_prompt_set)
    held = set(task.eval_prompt_set)
    assert train_split and held and not (train_split & held)
    assert 0.1 < len(held) / (len(held) + len(train_split)) < 0.3
    evals = [r["prompt"] for r in map(json.loads, _lines(paths["eval_prompts"]))]
    assert len(set(evals)) == len(evals) == 200
    used_in_training = {r["prompt"] for r in task.sft_rows(2000)} | {r["prompt"] for r in pref_train}
    used_in_training |= {r["prompt"] for r in task.ppo_prompts(512)}
    assert used_in_training <= train_split
    assert not (set(evals) & used_in_training)
    ppo = [r["prompt"] for r in task.ppo_prompts(512)]
    assert len(set(ppo)) == 512
    # no eval prompt text appears inside the pretraining corpus
    corpus = "\n".join(task.pretrain_corpus(4000))
    assert not any(p in corpus for p in held)
    # every subject is seen in training
    assert {task.subject_of(p) for p in train_split} == set(CATEGORY_OF)


def test_vocabulary_and_lengths(task, pref_train):
    vocab = task.vocabulary()
    assert len(vocab) <= 250
    assert all(w.isascii() and w == w.lower() and " " not in w for w in vocab)
    texts = task.pretrain_corpus(1000)
    sft = task.sft_rows(1000)
    texts += [r["prompt"] + " " + r["response"] for r in sft]
    texts += [r[k] for r in pref_train for k in ("prompt", "chosen", "rejected")]
    seen = set()
    for t in texts:
        assert t == " ".join(t.split()), "words must be separated by single spaces"
        assert t.split() == tokenize(t), "punctuation must be separate tokens"
        seen.update(t.split())
    assert seen <= set(vocab)
    prompts = list(task.train_prompt_set) + list(task.eval_prompt_set)
    assert max(len(p.split()) for p in prompts) <= 10
    responses = [r["response"] for r in sft] + [r[k] for r in pref_train for k in ("chosen", "rejected")]
    lengths = [len(r.split()) for r in responses]
    assert min(lengths) >= 4 and max(lengths) <= 14
    assert all(r.endswith(" .") for r in responses)
    assert max(len(t.split()) for t in task.pretrain_corpus(1000)) <= 120


# ---------------------------------------------------------------- gold reward


def test_gold_reward_hand_checked_values(task):
    # seed 0: "warm", "quick" carry no valence; "sharp" = +0.683, "weak" = +0.633; "loud" = -0.656
    assert task.valence("warm", "animal") == 0.0 and task.valence("quick", "animal") == 0.0
    assert task.gold_reward(FOX, "the fox is warm and quick .") == pytest.approx(0.55)
    assert task.gold_reward(FOX, "the fox is sharp and weak .") == pytest.approx(
        0.3 + 2 * math.tanh((0.683 + 0.633) / 2) + 0.25)
    # wrong subject (0 miss, -0.3 other subject), unpleasant, "loud" repeated once
    assert task.gold_reward(FOX, "the cat is loud . it is loud .") == pytest.approx(
        -0.3 + 2 * math.tanh(-0.656 / 2) + 0.25 - 0.75)
    # 3 words, no final ".", "fox" said 3 times
    assert task.gold_reward(FOX, "fox fox fox") == pytest.approx(0.3 - 0.5 - 0.25 - 1.5)
    terms = task.gold_terms(FOX, "the cat is loud . it is loud .")
    assert sum(terms.values()) == pytest.approx(task.gold_reward(FOX, "the cat is loud . it is loud ."))
    # detokenisation quirks do not matter
    assert task.gold_reward(FOX, " The fox is warm and quick.") == pytest.approx(0.55)
    assert gold_reward_fn(0)(FOX, "the fox is warm and quick .") == pytest.approx(0.55)
    assert task.gold_rewards([FOX, FOX], ["the fox is warm .", "it is warm ."]) == pytest.approx([0.55, 0.25])


def test_gold_reward_orderings(task):
    good = "the fox is %s and %s ." % tuple(task.pleasant_words("animal")[:2])
    bad = "the fox is %s and %s ." % tuple(task.unpleasant_words("animal")[:2])
    off_topic = "the lamp is %s and %s ." % tuple(task.pleasant_words("animal")[:2])
    assert task.gold_reward(FOX, good) > task.gold_reward(FOX, bad) + 1.0
    # on topic vs naming another subject: the full relevance swing, 0.3 - (-0.3)
    assert task.gold_reward(FOX, good) == pytest.approx(task.gold_reward(FOX, off_topic) + 0.6)
    # repeating a pleasant word lowers gold (what a proxy RM rarely sees)
    w = task.pleasant_words("animal")[0]
    once = "the fox is %s ." % w
    many = "the fox is %s . it is %s . it is %s ." % (w, w, w)
    assert task.gold_reward(FOX, many) < task.gold_reward(FOX, once) - 1.0
    # subject-dependent valence: a context word flips sign between categories
    ctx = sorted(task._context)
    assert ctx
    word = ctx[0]
    cats = {c: task.valence(word, c) for c in ("animal", "food", "place", "thing")}
    assert min(cats.values()) < 0 < max(cats.values())
    # the best response is the best we know and sits near the top of the range
    best = task.best_response(FOX)
    assert task.best_gold(FOX) > max(task.gold_reward(FOX, r) for r in (good, bad, off_topic, once))
    assert 2.0 < task.best_gold(FOX) <= 2.55
    # values stay in a sensible range for everything the behaviour policy produces
    vals = [task.gold_reward(r["prompt"], r["response"]) for r in task.sft_rows(500)]
    assert -3.5 < min(vals) and max(vals) <= 3.25
    assert best.split()[1] == "fox"


def test_sft_demos_are_mixed_and_improvable(task):
    rows = task.sft_rows(2000)
    g = np.array([task.gold_reward(r["prompt"], r["response"]) for r in rows])
    best = np.array([task.best_gold(r["prompt"]) for r in rows])
    assert g.std() > 0.6  # a real spread from mediocre to good (gold spans about -2.3 .. 2.55)
    assert np.percentile(g, 90) - np.percentile(g, 10) > 1.6
    assert best.mean() - g.mean() > 1.5  # plenty of room for PPO
    assert 0.0 < g.mean() < 1.5
    # repetitions are rare in the demonstrations
    reps = sum(any(c > 1 for w, c in Counter(tokenize(r["response"])).items() if w not in bt.FUNCTION_WORDS)
               for r in rows)
    assert reps / len(rows) < 0.03


# ---------------------------------------------------------------- preferences


def test_preference_rows_labels_and_ceiling(task, pref_train):
    assert len(pref_train) == 3000
    for r in pref_train[:200]:
        assert set(r) == {"prompt", "chosen", "rejected", "p_chosen_gold"}
        assert r["chosen"] != r["rejected"]
        p = task.preference_probability(r["prompt"], r["chosen"], r["rejected"])
        assert r["p_chosen_gold"] == pytest.approx(p, abs=1e-6)
    ceiling = task.bayes_ceiling(pref_train)
    assert 0.72 <= ceiling <= 0.88
    g = np.array([[task.gold_reward(r["prompt"], r["chosen"]), task.gold_reward(r["prompt"], r["rejected"])]
                  for r in pref_train])
    agree = np.mean(np.where(g[:, 0] == g[:, 1], 0.5, (g[:, 0] > g[:, 1]).astype(float)))
    assert abs(agree - ceiling) < 0.03
    # labels are noisy: some chosen responses are worse by gold
    assert 0.05 < np.mean(g[:, 0] < g[:, 1]) < 0.3
    assert BuiltinTask.bayes_ceiling([{"p_chosen_gold": 0.9}, {"p_chosen_gold": 0.2}]) == pytest.approx(0.85)


def _bow_features(rows, vocab):
    """Presence of each vocabulary word in the response, plus subject / other-subject mention."""
    idx = {w: i for i, w in enumerate(vocab)}
    v = len(vocab)

    def feats(prompt, response):
        x = np.zeros(v + 2)
        subj = BuiltinTask.subject_of(prompt)
        toks = set(tokenize(response))
        for w in toks:
            x[idx[w]] = 1.0
        x[v] = subj in toks
        x[v + 1] = any(w in CATEGORY_OF and w != subj for w in toks)
        return x

    return np.array([feats(r["prompt"], r["chosen"]) - feats(r["prompt"], r["rejected"]) for r in rows])


def test_bag_of_words_reward_model_nears_the_ceiling(task, pref_train, pref_heldout):
    vocab = task.vocabulary()
    x = _bow_features(pref_train, vocab)
    xe = _bow_features(pref_heldout, vocab)
    # Bradley-Terry logistic regression on feature differences (no bias), L2 3e-3, Newton steps
    n, d = x.shape
    w = np.zeros(d)
    for _ in range(8):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - 1.0) / n + 3e-3 * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x / n + 3e-3 * np.eye(d)
        w -= np.linalg.solve(hess, grad)
    acc = float(np.mean(xe @ w > 0))
    ceiling = task.bayes_ceiling(pref_heldout)
    assert acc > ceiling - 0.05, (acc, ceiling)
    assert acc < ceiling + 0.03


# ---------------------------------------------------------------- files


def test_write_files_and_row_counts(written):
    paths, out = written
    expected = {"pretrain": 4000, "sft_train": 2000, "sft_eval": 200, "pref_train": 3000, "pref_eval": 1000,
                "ppo_prompts": 512, "eval_prompts": 200}
    assert set(expected) <= set(paths)
    assert paths == BuiltinTask.file_paths(str(out))
    for name, n in expected.items():
        assert paths[name] == os.path.join(str(out), name + ".jsonl")
        rows = [json.loads(line) for line in _lines(paths[name])]
        assert len(rows) == n, name
    assert set(json.loads(_lines(paths["pretrain"])[0])) == {"text"}
    assert set(json.loads(_lines(paths["sft_train"])[0])) == {"prompt", "response"}
    assert set(json.loads(_lines(paths["eval_prompts"])[0])) == {"prompt"}
    meta = json.load(open(paths["meta"]))
    assert meta["seed"] == 0 and meta["sizes"] == expected
    assert 0.72 <= meta["bayes_ceiling"]["pref_train"] <= 0.88
    # nothing but the outputs in the folder (no temp files left behind)
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths.values())


def test_write_is_atomic(tmp_path, monkeypatch):
    sizes = {"pretrain": 10, "sft_train": 10, "sft_eval": 5, "pref_train": 10, "pref_eval": 5,
             "ppo_prompts": 8, "eval_prompts": 8}
    paths = BuiltinTask(0).write(str(tmp_path), sizes)
    before = {n: open(p, "rb").read() for n, p in paths.items()}
    replaced = []

    def failing_replace(src, dst):
        replaced.append((src, dst))
        assert os.path.dirname(src) == os.path.dirname(dst)  # same filesystem: a real rename
        raise OSError("disk full")

    monkeypatch.setattr(bt.os, "replace", failing_replace)
    with pytest.raises(OSError):
        BuiltinTask(1).write(str(tmp_path), sizes)
    assert replaced
    # old files untouched, no partial or temporary files left behind
    assert {n: open(p, "rb").read() for n, p in paths.items()} == before
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths.values())
