"""The built-in task: a small, seeded synthetic world with a hidden gold reward.

It is the default data of the demo and the tests. Everything here is pure Python
(plus ``hashlib``/``json``); no torch, no downloads. One seed fixes the world (which
words are pleasant or unpleasant, which prompts are held out) and every data set
drawn from it, so the same seed always writes byte-identical files.

Text format
-----------
Lowercase ASCII words separated by single spaces; punctuation marks are separate
tokens (" .", " ,", " :", " ?").

* prompt:   ``human : describe the red fox . assistant :`` (8-10 words)
* response: ``the fox is calm and warm . it sings often .`` (4-14 words)
* a dialogue (pretraining, SFT) is ``prompt + " " + response``.

Gold reward (hidden; for evaluation only)
-----------------------------------------
``g = relevance + valence + form + repetition`` with

* relevance  = +0.3 if the response names the prompt's subject noun, else 0;
  another -0.3 if it names any other subject noun;
* valence    = 2 * tanh(s / 2), s = sum over the DISTINCT words of the response of a
  hidden per-word value: per seed, some adjectives/verbs are pleasant (+0.3..+0.7),
  some unpleasant (-0.3..-0.7), a few are pleasant for two subject categories and
  unpleasant for the other two, the rest 0;
* form       = +0.25 if the response ends with " ." else -0.5; -0.25 per word under 4,
  -0.3 per word over 14;
* repetition = -0.75 per extra occurrence of a content word (anything but
  function words and punctuation).

See docs/builtin_task.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import tempfile
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = [
    "BuiltinTask",
    "gold_reward_fn",
    "tokenize",
    "DEFAULT_SIZES",
    "CATEGORIES",
]

# --------------------------------------------------------------------------- lexicon

CATEGORIES: Dict[str, Tuple[str, ...]] = {
    "animal": ("fox", "cat", "dog", "bird", "horse", "fish", "bear", "owl"),
    "food": ("apple", "bread", "soup", "cake", "cheese", "rice", "pear", "pie"),
    "place": ("river", "forest", "city", "hill", "lake", "beach", "village", "garden"),
    "thing": ("lamp", "chair", "boat", "clock", "drum", "kite", "book", "hat"),
}
SUBJECTS: Tuple[str, ...] = tuple(w for ws in CATEGORIES.values() for w in ws)
CATEGORY_OF: Dict[str, str] = {w: c for c, ws in CATEGORIES.items() for w in ws}

# Modifiers used in prompts; they never carry valence.
MODIFIERS = ("red", "blue", "green", "brown", "white", "black", "small", "big", "old", "young")

ADJECTIVES = (
    "quick", "slow", "loud", "quiet", "bright", "dark", "warm", "cold", "soft", "hard",
    "sweet", "sour", "wild", "calm", "busy", "lazy", "clean", "dirty", "strong", "weak",
    "happy", "sad", "fresh", "stale", "gentle", "rough", "smooth", "sharp", "tall", "flat",
    "shiny", "dull", "heavy", "light", "funny", "shy",
)
VERBS = (
    "runs", "jumps", "sleeps", "sings", "shines", "glows", "moves", "rests", "waits", "falls",
    "grows", "shakes", "spins", "rolls", "floats", "sinks", "swims", "flies", "hides", "smiles",
    "cries", "hums", "stands", "turns",
)
ADVERBS = ("fast", "slowly", "often", "always", "sometimes", "quietly", "loudly", "together", "alone", "again")
PLACES = ("home", "road", "sea", "sky", "field", "town", "door", "tree", "wall", "park")
TIMES = ("morning", "night", "winter", "summer", "evening")
INTENSIFIERS = ("very", "quite", "really")

PROMPT_TEMPLATES = (
    "human : describe the {np} . assistant :",
    "human : talk about the {np} . assistant :",
    "human : write about the {np} . assistant :",
    "human : what about the {np} ? assistant :",
)

# Words whose repetition is not penalised.
FUNCTION_WORDS = frozenset(
    """
    the a it is and but also very quite really i think near in with so this that there
    my like because to be what about describe talk write human assistant one of at
    . , : ? !
    """.split()
)

# Valence design (per seed, drawn from ADJECTIVES and VERBS).
N_PLEASANT_ADJ, N_UNPLEASANT_ADJ, N_CONTEXT_ADJ = 10, 10, 4
N_PLEASANT_VERB, N_UNPLEASANT_VERB, N_CONTEXT_VERB = 5, 5, 2
VALENCE_LOW, VALENCE_HIGH = 0.3, 0.7
CONTEXT_VALENCE = 0.5

# Gold-reward constants.
# small on purpose: naming the subject needs copying from the prompt, which the tiny default models do not learn
# within the CPU budget; the improvable signal is mostly the hidden valence, form and repetition
REL_HIT, REL_MISS, REL_OTHER = 0.3, 0.0, -0.3
VALENCE_SCALE = 2.0
FORM_END, FORM_NO_END = 0.25, -0.5
SHORT_PENALTY, LONG_PENALTY = 0.25, 0.3
REPEAT_PENALTY = 0.75
MIN_RESPONSE_WORDS, MAX_RESPONSE_WORDS = 4, 14
MAX_PROMPT_WORDS = 10

# Preference labels: P(a > b) = sigmoid((g(a) - g(b)) / NOISE_TEMPERATURE).
NOISE_TEMPERATURE = 0.7
EVAL_FRACTION = 0.2
REPEAT_RATE = 0.02  # chance that a behaviour response repeats a content word

DEFAULT_SIZES: Dict[str, int] = {
    "pretrain": 4000,
    "sft_train": 2000,
    "sft_eval": 200,
    "pref_train": 3000,
    "pref_eval": 1000,  # 1000 pairs: RM accuracy to about +-1.4 points
    "ppo_prompts": 512,
    "eval_prompts": 200,
}

_TOKEN_RE = re.compile(r"[a-z]+|[^\sa-z]")


def tokenize(text: str) -> List[str]:
    """Words and punctuation marks of ``text`` (lowercased; "fox." -> ["fox", "."])."""
    return _TOKEN_RE.findall(text.lower())


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _atomic_write_lines(path: str, lines: Iterable[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _jsonl(rows: Iterable[dict]) -> List[str]:
    return [json.dumps(r, ensure_ascii=True, separators=(", ", ": ")) for r in rows]


# --------------------------------------------------------------------------- the task


class BuiltinTask:
    """The seeded synthetic world: corpus, demonstrations, preferences, prompts, gold reward."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.noise_temperature = NOISE_TEMPERATURE
        self._init_valence()
        self._init_prompts()

    # ---------------------------------------------------------------- world setup

    def _rng(self, *stream: object) -> random.Random:
        # str seeds are hashed with SHA-512 by `random`, independent of PYTHONHASHSEED.
        return random.Random("rlhf_ds.builtin:%d:%s" % (self.seed, ":".join(str(s) for s in stream)))

    def _init_valence(self) -> None:
        rng = self._rng("valence")
        cats = sorted(CATEGORIES)
        self._base: Dict[str, float] = {}
        self._context: Dict[str, Dict[str, float]] = {}

        def assign(words: Sequence[str], n_pos: int, n_neg: int, n_ctx: int) -> None:
            ws = list(words)
            rng.shuffle(ws)
            for w in ws[:n_pos]:
                self._base[w] = round(rng.uniform(VALENCE_LOW, VALENCE_HIGH), 3)
            for w in ws[n_pos:n_pos + n_neg]:
                self._base[w] = -round(rng.uniform(VALENCE_LOW, VALENCE_HIGH), 3)
            for w in ws[n_pos + n_neg:n_pos + n_neg + n_ctx]:
                good = set(rng.sample(cats, 2))
                self._context[w] = {c: (CONTEXT_VALENCE if c in good else -CONTEXT_VALENCE) for c in cats}

        assign(ADJECTIVES, N_PLEASANT_ADJ, N_UNPLEASANT_ADJ, N_CONTEXT_ADJ)
        assign(VERBS, N_PLEASANT_VERB, N_UNPLEASANT_VERB, N_CONTEXT_VERB)

    def _init_prompts(self) -> None:
        self._prompt_info: Dict[str, Tuple[str, Optional[str]]] = {}
        train, held = [], []
        for template in PROMPT_TEMPLATES:
            for subj in SUBJECTS:
                for mod in (None,) + MODIFIERS:
                    np_ = subj if mod is None else "%s %s" % (mod, subj)
                    prompt = template.format(np=np_)
                    self._prompt_info[prompt] = (subj, mod)
                    h = hashlib.sha256(("%d|%s" % (self.seed, prompt)).encode()).digest()
                    frac = int.from_bytes(h[:8], "big") / 2.0 ** 64
                    (held if frac < EVAL_FRACTION else train).append(prompt)
        self._train_prompts: Tuple[str, ...] = tuple(train)
        self._eval_prompts: Tuple[str, ...] = tuple(held)

    # ---------------------------------------------------------------- introspection

    @property
    def train_prompt_set(self) -> Tuple[str, ...]:
        return self._train_prompts

    @property
    def eval_prompt_set(self) -> Tuple[str, ...]:
        return self._eval_prompts

    def vocabulary(self) -> List[str]:
        """Every word the world can produce (sorted)."""
        words = set(FUNCTION_WORDS) | set(SUBJECTS) | set(MODIFIERS) | set(ADJECTIVES) | set(VERBS)
        words |= set(ADVERBS) | set(PLACES) | set(TIMES) | set(INTENSIFIERS)
        for t in PROMPT_TEMPLATES:
            words |= set(tokenize(t.replace("{np}", "")))
        words |= set(self._plain_words())
        return sorted(words)

    @staticmethod
    def _plain_words() -> List[str]:
        return ["there", "is", "a", "in", "i", "like", "because", "my", "friend", "sees", "one", "day", "when"]

    def valence(self, word: str, category: Optional[str] = None) -> float:
        """Hidden value of one word (0 for words without valence)."""
        if word in self._base:
            return self._base[word]
        ctx = self._context.get(word)
        if ctx is not None and category is not None:
            return ctx[category]
        return 0.0

    def pleasant_words(self, category: Optional[str] = None) -> List[str]:
        return sorted(w for w in list(ADJECTIVES) + list(VERBS) if self.valence(w, category) > 0)

    def unpleasant_words(self, category: Optional[str] = None) -> List[str]:
        return sorted(w for w in list(ADJECTIVES) + list(VERBS) if self.valence(w, category) < 0)

    @staticmethod
    def subject_of(prompt: str) -> Optional[str]:
        """The subject noun of a prompt (the last subject noun it names), or None."""
        found = [w for w in tokenize(prompt) if w in CATEGORY_OF]
        return found[-1] if found else None

    # ---------------------------------------------------------------- gold reward

    def gold_terms(self, prompt: str, response: str) -> Dict[str, float]:
        """The gold reward split into its four terms (they sum to ``gold_reward``)."""
        subj = self.subject_of(prompt)
        cat = CATEGORY_OF.get(subj) if subj else None
        toks = tokenize(response)
        tokset = set(toks)

        rel = 0.0
        if subj is not None:
            rel = REL_HIT if subj in tokset else REL_MISS
            if any(w in CATEGORY_OF and w != subj for w in tokset):
                rel += REL_OTHER

        raw = sum(self.valence(w, cat) for w in sorted(tokset))
        val = VALENCE_SCALE * math.tanh(raw / VALENCE_SCALE)

        n = len(toks)
        form = FORM_END if (toks and toks[-1] == ".") else FORM_NO_END
        form -= SHORT_PENALTY * max(0, MIN_RESPONSE_WORDS - n)
        form -= LONG_PENALTY * max(0, n - MAX_RESPONSE_WORDS)

        counts: Dict[str, int] = {}
        for w in toks:
            if w not in FUNCTION_WORDS:
                counts[w] = counts.get(w, 0) + 1
        rep = -REPEAT_PENALTY * sum(c - 1 for c in counts.values())
        return {"relevance": rel, "valence": val, "form": form, "repetition": rep}

    def gold_reward(self, prompt: str, response: str) -> float:
        """The hidden gold reward, about [-3, 3.25] in the grammar. For EVALUATION ONLY."""
        t = self.gold_terms(prompt, response)
        return t["relevance"] + t["valence"] + t["form"] + t["repetition"]

    def gold_rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> List[float]:
        if len(prompts) != len(responses):
            raise ValueError("gold_rewards: %d prompts but %d responses" % (len(prompts), len(responses)))
        return [self.gold_reward(p, r) for p, r in zip(prompts, responses)]

    def best_response(self, prompt: str) -> str:
        """A near-optimal response within the grammar: names the subject, uses the most
        pleasant adjectives/verbs for the subject's category once each, ends with " ." in
        12 words. Its gold reward is the 'best achievable' reference (about 3.1)."""
        subj = self.subject_of(prompt)
        cat = CATEGORY_OF.get(subj) if subj else None
        head = "the %s" % subj if subj else "it"
        a = sorted(ADJECTIVES, key=lambda w: (-self.valence(w, cat), w))
        v = sorted(VERBS, key=lambda w: (-self.valence(w, cat), w))
        candidates = [
            "%s is %s and %s . it is %s and %s ." % (head, a[0], a[1], a[2], a[3]),
            "%s is %s and %s . it %s and is %s ." % (head, a[0], a[1], v[0], a[2]),
            "%s %s and is %s . it %s and is %s ." % (head, v[0], a[0], v[1], a[1]),
        ]
        return max(candidates, key=lambda r: (self.gold_reward(prompt, r), r))

    def best_gold(self, prompt: str) -> float:
        return self.gold_reward(prompt, self.best_response(prompt))

    def preference_probability(self, prompt: str, a: str, b: str) -> float:
        """Gold probability that response ``a`` is preferred to ``b`` (Bradley-Terry)."""
        return _sigmoid((self.gold_reward(prompt, a) - self.gold_reward(prompt, b)) / self.noise_temperature)

    @staticmethod
    def bayes_ceiling(rows: Sequence[dict]) -> float:
        """Best achievable pairwise accuracy on ``rows``: mean of max(p, 1 - p)."""
        ps = [float(r["p_chosen_gold"]) for r in rows]
        if not ps:
            raise ValueError("bayes_ceiling: no rows")
        return sum(max(p, 1.0 - p) for p in ps) / len(ps)

    # ---------------------------------------------------------------- grammar

    def _word(self, rng: random.Random, pool: Sequence[str], cat: Optional[str], q: float,
              used: set) -> str:
        """One adjective/verb: biased towards pleasant words with quality ``q`` in [0, 1]
        (q < 0 means the neutral, unbiased pretraining sampler)."""
        avail = [w for w in pool if w not in used] or list(pool)
        if q >= 0:
            u = rng.random()
            if u < 0.7 * q:
                cand = [w for w in avail if self.valence(w, cat) > 0]
            elif u < 0.7 * q + 0.35 * (1.0 - q):
                cand = [w for w in avail if self.valence(w, cat) < 0]
            else:
                cand = avail
            if cand:
                avail = cand
        w = rng.choice(avail)
        used.add(w)
        return w

    def _sample_response(self, rng: random.Random, subj: str, mod: Optional[str], q: float) -> str:
        cat = CATEGORY_OF[subj]
        used: set = set()
        neutral = q < 0
        # who the response talks about
        u = rng.random()
        p_hit = 0.5 if neutral else 0.3 + 0.6 * q
        if u < p_hit:
            head = subj
        elif u < p_hit + (1.0 - p_hit) * 0.5:
            head = rng.choice([s for s in SUBJECTS if s != subj])
        else:
            head = None
        if head is None:
            np_ = "it"
        elif head == subj and mod is not None and rng.random() < 0.3:
            np_ = "the %s %s" % (mod, head)
        else:
            np_ = "the %s" % head

        def adj() -> str:
            return self._word(rng, ADJECTIVES, cat, q, used)

        def verb() -> str:
            return self._word(rng, VERBS, cat, q, used)

        def clause(np: str) -> List[str]:
            k = rng.randrange(6)
            if k == 0:
                words = [np, "is", adj()]
                if rng.random() < 0.3:
                    words.insert(2, rng.choice(INTENSIFIERS))
            elif k == 1:
                words = [np, "is", adj(), "and", adj()]
            elif k == 2:
                words = [np, verb(), rng.choice(ADVERBS)]
            elif k == 3:
                words = [np, verb(), "near the", rng.choice(PLACES)]
            elif k == 4:
                words = ["i think", np, "is", adj()]
            else:
                words = [np, verb(), "and is", adj()]
            return " ".join(words).split() + ["."]

        toks = clause(np_)
        n_clauses = 1 + (rng.random() < 0.75) + (rng.random() < 0.25)
        for _ in range(n_clauses - 1):
            nxt = clause("it")
            if len(toks) + len(nxt) > MAX_RESPONSE_WORDS:
                break
            toks += nxt
        # rare repetition of a content word (so the proxy RM hardly sees the penalty)
        if not neutral and rng.random() < REPEAT_RATE and used:
            w = rng.choice(sorted(used))
            extra = ["it", "is" if w in ADJECTIVES else "", w, "."]
            extra = [x for x in extra if x]
            if len(toks) + len(extra) <= MAX_RESPONSE_WORDS:
                toks += extra
        return " ".join(toks)

    def _plain_sentence(self, rng: random.Random) -> str:
        subj = rng.choice(SUBJECTS)
        mod = rng.choice(MODIFIERS)
        k = rng.randrange(6)
        if k == 0:
            s = "there is a %s %s near the %s" % (mod, subj, rng.choice(PLACES))
        elif k == 1:
            s = "the %s %s %s %s in the %s" % (mod, subj, rng.choice(VERBS), rng.choice(ADVERBS), rng.choice(TIMES))
        elif k == 2:
            s = "i like the %s because it is %s" % (subj, rng.choice(ADJECTIVES))
        elif k == 3:
            s = "my friend sees a %s %s one day , and it is %s" % (mod, subj, rng.choice(ADJECTIVES))
        elif k == 4:
            s = "in the %s the %s is %s and %s" % (rng.choice(TIMES), subj, *rng.sample(ADJECTIVES, 2))
        else:
            s = "when the %s %s , the %s %s" % (subj, rng.choice(VERBS), rng.choice(SUBJECTS), rng.choice(VERBS))
        return s + " ."

    def _prompt_parts(self, prompt: str) -> Tuple[str, Optional[str]]:
        info = self._prompt_info.get(prompt)
        if info is None:
            raise KeyError("not a prompt of the built-in task: %r" % prompt)
        return info

    def _prompts(self, split: str) -> Tuple[str, ...]:
        if split == "train":
            return self._train_prompts
        if split == "eval":
            return self._eval_prompts
        raise ValueError("split must be 'train' or 'eval', got %r" % split)

    # ---------------------------------------------------------------- data sets

    def pretrain_corpus(self, n_docs: int = DEFAULT_SIZES["pretrain"]) -> List[str]:
        """Documents of the world's language: dialogues (training prompts + unbiased
        responses) and plain sentences. No valence bias, so pretraining teaches only the language."""
        rng = self._rng("pretrain")
        docs = []
        for _ in range(n_docs):
            parts = []
            for _ in range(rng.randint(1, 3)):
                if rng.random() < 0.5:
                    prompt = rng.choice(self._train_prompts)
                    subj, mod = self._prompt_parts(prompt)
                    parts.append(prompt + " " + self._sample_response(rng, subj, mod, -1.0))
                else:
                    parts.append(" ".join(self._plain_sentence(rng) for _ in range(rng.randint(1, 3))))
            docs.append(" ".join(parts))
        return docs

    def sft_rows(self, n: int = DEFAULT_SIZES["sft_train"], split: str = "train") -> List[dict]:
        """Demonstrations of mixed quality (quality q ~ U(0, 1) per demo).

        ``split="eval"`` draws from the held-out prompts (for an SFT validation loss)."""
        rng = self._rng("sft", split)
        prompts = self._prompts(split)
        rows = []
        for _ in range(n):
            prompt = rng.choice(prompts)
            subj, mod = self._prompt_parts(prompt)
            rows.append({"prompt": prompt, "response": self._sample_response(rng, subj, mod, rng.random())})
        return rows

    def preference_rows(self, n: int = DEFAULT_SIZES["pref_train"], split: str = "train") -> List[dict]:
        """Pairs from the behaviour policy (same sampler as the SFT demos), labelled by a
        Bradley-Terry draw on the gold reward. ``p_chosen_gold`` = P(chosen is better)."""
        rng = self._rng("pref", split)
        prompts = self._prompts(split)
        rows = []
        for _ in range(n):
            prompt = rng.choice(prompts)
            subj, mod = self._prompt_parts(prompt)
            a = self._sample_response(rng, subj, mod, rng.random())
            b = self._sample_response(rng, subj, mod, rng.random())
            while b == a:
                b = self._sample_response(rng, subj, mod, rng.random())
            p_a = self.preference_probability(prompt, a, b)
            if rng.random() < p_a:
                chosen, rejected, p = a, b, p_a
            else:
                chosen, rejected, p = b, a, 1.0 - p_a
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                         "p_chosen_gold": round(p, 6)})
        return rows

    def _prompt_rows(self, n: int, split: str) -> List[dict]:
        rng = self._rng("prompts", split)
        pool = list(self._prompts(split))
        out: List[str] = []
        while len(out) < n:
            batch = pool[:]
            rng.shuffle(batch)
            out.extend(batch[: n - len(out)])
        return [{"prompt": p} for p in out]

    def ppo_prompts(self, n: int = DEFAULT_SIZES["ppo_prompts"]) -> List[dict]:
        """Prompts for PPO rollouts, from the training split (distinct prompts while n <= the split size)."""
        return self._prompt_rows(n, "train")

    def eval_prompts(self, n: int = DEFAULT_SIZES["eval_prompts"]) -> List[dict]:
        """Held-out prompts, disjoint from every training prompt (split by a seeded hash)."""
        return self._prompt_rows(n, "eval")

    # ---------------------------------------------------------------- files

    FILE_NAMES = ("pretrain", "sft_train", "sft_eval", "pref_train", "pref_eval", "ppo_prompts", "eval_prompts")

    @classmethod
    def file_paths(cls, out_dir: str) -> Dict[str, str]:
        """Where ``write(out_dir)`` puts each file: name -> path (``"meta"`` is task.json)."""
        paths = {name: os.path.join(out_dir, name + ".jsonl") for name in cls.FILE_NAMES}
        paths["meta"] = os.path.join(out_dir, "task.json")
        return paths

    def write(self, out_dir: str, sizes: Optional[Dict[str, int]] = None) -> Dict[str, str]:
        """Write every data set of the task to ``out_dir`` atomically; return name -> path.

        Files: pretrain.jsonl {"text"}, sft_{train,eval}.jsonl {"prompt","response"},
        pref_{train,eval}.jsonl {"prompt","chosen","rejected","p_chosen_gold"},
        ppo_prompts.jsonl / eval_prompts.jsonl {"prompt"}, task.json (seed, sizes, ceilings)."""
        sz = dict(DEFAULT_SIZES)
        if sizes:
            unknown = set(sizes) - set(sz)
            if unknown:
                raise ValueError("unknown sizes: %s" % sorted(unknown))
            sz.update(sizes)
        os.makedirs(out_dir, exist_ok=True)
        pref_train = self.preference_rows(sz["pref_train"], "train")
        pref_eval = self.preference_rows(sz["pref_eval"], "eval")
        sets = {
            "pretrain": [{"text": t} for t in self.pretrain_corpus(sz["pretrain"])],
            "sft_train": self.sft_rows(sz["sft_train"], "train"),
            "sft_eval": self.sft_rows(sz["sft_eval"], "eval"),
            "pref_train": pref_train,
            "pref_eval": pref_eval,
            "ppo_prompts": self.ppo_prompts(sz["ppo_prompts"]),
            "eval_prompts": self.eval_prompts(sz["eval_prompts"]),
        }
        paths = self.file_paths(out_dir)
        for name, rows in sets.items():
            _atomic_write_lines(paths[name], _jsonl(rows))
        meta = {
            "task": "builtin",
            "seed": self.seed,
            "sizes": sz,
            "noise_temperature": self.noise_temperature,
            "bayes_ceiling": {
                "pref_train": round(self.bayes_ceiling(pref_train), 6) if pref_train else None,
                "pref_eval": round(self.bayes_ceiling(pref_eval), 6) if pref_eval else None,
            },
            "files": {k: os.path.basename(v) for k, v in paths.items() if k != "meta"},
        }
        _atomic_write_lines(paths["meta"], [json.dumps(meta, indent=2, sort_keys=True)])
        return paths


def gold_reward_fn(seed: int = 0) -> Callable[[str, str], float]:
    """A callable ``(prompt, response) -> gold reward`` for the built-in task of ``seed``."""
    return BuiltinTask(seed).gold_reward
