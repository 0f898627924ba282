"""Turn raw records into normalized SFT, preference and prompt examples.

Each format is detected from the columns present (``fmt="auto"``) or named explicitly.
``columns`` maps a canonical column name to the user's column name, e.g.
``{"prompt": "instruction", "response": "output"}``. Bad rows raise :class:`DataError`
naming file, row and field, or are skipped and counted with ``on_bad_row="skip"``.

SFT formats:        prompt_response, prompt_completion, messages
Preference formats: ranked (prompt + responses, best first), stack_exchange
                    (question/response_j/response_k, j preferred), prompt_chosen_rejected,
                    dialogue (chosen/rejected full "\\n\\nHuman: ... \\n\\nAssistant: ..." texts)
Prompt formats:     messages (last turn from the user), prompt, question

With ``fmt="auto"`` each file is detected on its own (a folder may mix formats). ``load_*`` take one source or a list
(paths or ``SourceConfig``: own format, columns, prompt template, weight, row limit) and render plain prompts with the
template (``{prompt}``/``{question}``, optionally ending in ``{response}``: the whitespace before it then starts each
response), the same way for SFT, RM, PPO and evaluation (docs/data.md); sources that join prompt and response
differently are warned about (``check_joins``).
"""

from __future__ import annotations

import json
import logging
import math
import string
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .readers import DataError, Record, read_records

log = logging.getLogger("rlhf_ds")

ROLES = ("system", "user", "assistant")
ASSISTANT_MARKER = "\n\nAssistant:"
# Longest text (prompt, response, chat turn ...) accepted, in characters: a longer one is a bad row, refused before it
# reaches the tokenizer (a multi-megabyte cell is a broken export, and tokenizing it costs minutes and gigabytes).
MAX_TEXT_CHARS = 1_000_000


@dataclass
class SFTExample:
    """A prompt/response pair, or a chat whose last assistant turn is the response."""

    prompt: str | None = None
    response: str | None = None
    messages: list[dict] | None = None
    origin: str = field(default="", compare=False, repr=False)  # "file: row N", for messages


@dataclass
class PreferenceExample:
    """One comparison; ``group`` ties pairs expanded from the same source row together."""

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    weight: float = 1.0
    group: int = 0
    origin: str = field(default="", compare=False, repr=False)


@dataclass
class PromptExample:
    """A PPO prompt: plain text or a chat ending with a user turn.

    ``columns`` keeps the row's other fields (a reference answer, a test case ...) so a reward function can check the
    response against them.
    """

    prompt: str | None = None
    messages: list[dict] | None = None
    columns: dict = field(default_factory=dict)
    origin: str = field(default="", compare=False, repr=False)


@dataclass
class ParseReport:
    """What happened to the rows: ``kept`` counts source rows, not expanded pairs."""

    fmt: str = "auto"
    total: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = f"format {self.fmt!r}: {self.total} rows, kept {self.kept}"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.skipped.items()))
            text += f", skipped {sum(self.skipped.values())} ({reasons})"
        return text


class _BadRow(Exception):
    """Internal: a row-level problem, turned into a DataError or a skip count by the caller."""

    def __init__(self, reason: str, field: str | None, detail: str):
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


class _Row:
    """Typed access to one record's fields through the user's column mapping."""

    def __init__(self, data: dict, columns: dict[str, str]):
        self.data, self.columns = data, columns

    def name(self, key: str) -> str:
        return self.columns.get(key, key)

    def has(self, key: str) -> bool:
        return self.data.get(self.name(key)) is not None

    def raw(self, key: str):
        name = self.name(key)
        if name not in self.data or self.data[name] is None:
            present = ", ".join(map(str, self.data)) or "none"
            raise _BadRow("missing field", name, f"missing field (columns present: {present})")
        return self.data[name]

    def text(self, key: str, allow_empty: bool = False) -> str:
        return _check_text(self.raw(key), self.name(key), allow_empty)

    def items(self, key: str) -> list:
        """A list field; CSV users may store it as a JSON string."""
        value, name = self.raw(key), self.name(key)
        if isinstance(value, str) and value.lstrip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise _BadRow("malformed list", name, f"not a valid JSON list: {err.msg}") from None
        if not isinstance(value, (list, tuple)):
            raise _BadRow("malformed list", name, f"expected a list, got {type(value).__name__}")
        return list(value)

    def margin(self) -> float:
        if not self.has("margin"):
            return 0.0
        value = self.data[self.name("margin")]
        try:
            margin = float(value)
        except (TypeError, ValueError):
            margin = math.nan
        if isinstance(value, bool) or not math.isfinite(margin):
            raise _BadRow("invalid margin", self.name("margin"), f"margin must be a finite number, got {value!r}")
        return margin


def _check_text(value, name: str, allow_empty: bool = False) -> str:
    """A text field; ``allow_empty`` for a preference response (an empty answer is a real answer, and still gets its
    EOS), never for a prompt, an SFT target or a chat turn."""
    if not isinstance(value, str):
        raise _BadRow("non-string value", name, f"expected text, got {type(value).__name__} {_preview(value)}")
    if len(value) > MAX_TEXT_CHARS:
        raise _BadRow(
            "text too long", name,
            f"text of {len(value):,} characters exceeds the {MAX_TEXT_CHARS:,}-character limit "
            "(rlhf_ds.data.formats.MAX_TEXT_CHARS); shorten it, or skip such rows with data.on_bad_row=skip",
        )
    if allow_empty:
        return value
    if not value:
        raise _BadRow("empty text", name, "empty text")
    if not value.strip():
        raise _BadRow("empty text", name, "empty text (only whitespace)")
    return value


def _preview(value, limit: int = 60) -> str:
    """A short repr for messages: a huge list or dict is summarised, not rendered in full."""
    if isinstance(value, (list, tuple, dict)) and len(value) > 8:
        return f"of {len(value)} items"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _messages(row: _Row) -> list[dict]:
    name = row.name("messages")
    turns = row.items("messages")
    if not turns:
        raise _BadRow("empty text", name, "empty message list")
    return [_turn(turn, f"{name}[{i}]") for i, turn in enumerate(turns)]


def _turn(turn, where: str) -> dict:
    if not isinstance(turn, dict):
        raise _BadRow("malformed list", where, f"expected a {{role, content}} object, got {type(turn).__name__}")
    role = turn.get("role")
    if role not in ROLES:
        raise _BadRow("unknown role", f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    if "content" not in turn or turn["content"] is None:
        raise _BadRow("missing field", f"{where}.content", "missing field")
    return {"role": role, "content": _check_text(turn["content"], f"{where}.content")}


def _last_role(row: _Row, turns: list[dict], role: str) -> list[dict]:
    if turns[-1]["role"] != role:
        where = f"{row.name('messages')}[{len(turns) - 1}].role"
        raise _BadRow("wrong last turn", where, f"last turn must be from the {role}, got {turns[-1]['role']!r}")
    return turns


# ---- SFT ---------------------------------------------------------------------------------


def _sft_prompt_response(row: _Row, group: int) -> list[SFTExample]:
    return [SFTExample(prompt=row.text("prompt"), response=row.text("response"))]


def _sft_prompt_completion(row: _Row, group: int) -> list[SFTExample]:
    return [SFTExample(prompt=row.text("prompt"), response=row.text("completion"))]


def _sft_messages(row: _Row, group: int) -> list[SFTExample]:
    return [SFTExample(messages=_last_role(row, _messages(row), "assistant"))]


SFT_FORMATS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "messages": (("messages",), _sft_messages),
    "prompt_response": (("prompt", "response"), _sft_prompt_response),
    "prompt_completion": (("prompt", "completion"), _sft_prompt_completion),
}


# ---- preferences -------------------------------------------------------------------------


def _pair(row: _Row, group: int, prompt: str, chosen_key: str, rejected_key: str) -> PreferenceExample:
    chosen, rejected = row.text(chosen_key, allow_empty=True), row.text(rejected_key, allow_empty=True)
    _check_distinct(chosen, rejected, row.name(chosen_key), row.name(rejected_key))
    return PreferenceExample(prompt, chosen, rejected, margin=row.margin(), group=group)


def _check_distinct(chosen: str, rejected: str, chosen_name: str, rejected_name: str) -> None:
    """A pair needs two different answers; one of them may be empty, not both."""
    if not chosen.strip() and not rejected.strip():
        raise _BadRow("empty text", rejected_name, f"both {chosen_name!r} and {rejected_name!r} are empty")
    if chosen == rejected:
        raise _BadRow("chosen identical to rejected", rejected_name, f"identical to {chosen_name!r}")


def _pref_prompt_chosen_rejected(row: _Row, group: int) -> list[PreferenceExample]:
    return [_pair(row, group, row.text("prompt"), "chosen", "rejected")]


def _pref_stack_exchange(row: _Row, group: int) -> list[PreferenceExample]:
    return [_pair(row, group, row.text("question"), "response_j", "response_k")]


def _pref_dialogue(row: _Row, group: int) -> list[PreferenceExample]:
    """Full dialogues: the prompt is the shared text up to the last common "\\n\\nAssistant:"."""
    pair = _pair(row, group, "", "chosen", "rejected")
    common = _common_prefix(pair.chosen, pair.rejected)
    cut = common.rfind(ASSISTANT_MARKER)
    if cut < 0:
        raise _BadRow("no common prompt", row.name("rejected"), f"chosen and rejected share no prefix ending in {ASSISTANT_MARKER!r}")
    cut += len(ASSISTANT_MARKER)
    pair.prompt, pair.chosen, pair.rejected = pair.chosen[:cut], pair.chosen[cut:], pair.rejected[cut:]
    _check_distinct(pair.chosen, pair.rejected, row.name("chosen"), row.name("rejected"))
    return [pair]


def _common_prefix(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return a[:n]


def _pref_ranked(row: _Row, group: int) -> list[PreferenceExample]:
    """Best-first list -> every (better, worse) pair, weighted so the prompt counts once."""
    prompt, name = row.text("prompt"), row.name("responses")
    responses = [_check_text(r, f"{name}[{i}]", allow_empty=True) for i, r in enumerate(row.items("responses"))]
    if len(responses) < 2:
        raise _BadRow("too few responses", name, f"need at least 2 ranked responses, got {len(responses)}")
    pairs = [(i, j) for i in range(len(responses)) for j in range(i + 1, len(responses))]
    for i, j in pairs:
        _check_distinct(responses[i], responses[j], f"{name}[{i}]", f"{name}[{j}]")
    margin, weight = row.margin(), 1.0 / len(pairs)
    return [PreferenceExample(prompt, responses[i], responses[j], margin, weight, group) for i, j in pairs]


PREFERENCE_FORMATS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "ranked": (("prompt", "responses"), _pref_ranked),
    "stack_exchange": (("question", "response_j", "response_k"), _pref_stack_exchange),
    "prompt_chosen_rejected": (("prompt", "chosen", "rejected"), _pref_prompt_chosen_rejected),
    "dialogue": (("chosen", "rejected"), _pref_dialogue),
}


# ---- prompts -----------------------------------------------------------------------------


def _other_columns(row: _Row, key: str) -> dict:
    """The row's fields except the one the prompt came from (under the user's name for it)."""
    return {k: v for k, v in row.data.items() if k != row.name(key)}


def _prompt_messages(row: _Row, group: int) -> list[PromptExample]:
    return [PromptExample(messages=_last_role(row, _messages(row), "user"), columns=_other_columns(row, "messages"))]


def _prompt_prompt(row: _Row, group: int) -> list[PromptExample]:
    return [PromptExample(prompt=row.text("prompt"), columns=_other_columns(row, "prompt"))]


def _prompt_question(row: _Row, group: int) -> list[PromptExample]:
    return [PromptExample(prompt=row.text("question"), columns=_other_columns(row, "question"))]


PROMPT_FORMATS: dict[str, tuple[tuple[str, ...], Callable]] = {
    "messages": (("messages",), _prompt_messages),
    "prompt": (("prompt",), _prompt_prompt),
    "question": (("question",), _prompt_question),
}


# ---- driver ------------------------------------------------------------------------------


def _as_records(records: Iterable) -> list[Record]:
    """Accept Records or plain dicts (the latter are named "<records>" in errors, rows counted from 1)."""
    return [r if isinstance(r, Record) else Record("<records>", i, r) for i, r in enumerate(records, start=1)]


def _detect(records: list[Record], formats: dict, columns: dict[str, str], kind: str) -> str:
    """The first format (in priority order) whose columns all appear in the data."""
    present = {key for record in records for key in record.data}
    for name, (required, _) in formats.items():
        if all(columns.get(key, key) in present for key in required):
            return name
    expected = "; ".join(f"{name}: {', '.join(req)}" for name, (req, _) in formats.items())
    raise DataError(
        f"cannot tell the {kind} format from columns [{', '.join(sorted(map(str, present)))}]; "
        f"expected one of ({expected}); rename columns with columns={{canonical: yours}} or pass fmt=",
        file=records[0].file,
    )


def _parse(records, fmt: str, columns: dict | None, on_bad_row: str, formats: dict, kind: str) -> tuple[list, ParseReport]:
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if fmt != "auto" and fmt not in formats:
        raise ValueError(f"unknown {kind} format {fmt!r}; choose 'auto' or one of {', '.join(formats)}")
    records, columns = _as_records(records), dict(columns or {})
    by_file: dict[str, list[Record]] = {}
    for record in records:
        by_file.setdefault(record.file, []).append(record)
    # each file of a source (a folder may mix formats) has its own format
    fmts = {file: fmt if fmt != "auto" else _detect(rows, formats, columns, kind) for file, rows in by_file.items()}
    report, examples = ParseReport(fmt=", ".join(dict.fromkeys(fmts.values())) or fmt, total=len(records)), []
    for group, record in enumerate(records):
        try:
            parsed = formats[fmts[record.file]][1](_Row(record.data, columns), group)
        except _BadRow as bad:
            if on_bad_row == "error":
                raise DataError(bad.detail, record.file, record.row, bad.field) from None
            report.skipped[bad.reason] = report.skipped.get(bad.reason, 0) + 1
            continue
        for ex in parsed:
            ex.origin = f"{record.file}: row {record.row}"
        examples.extend(parsed)
        report.kept += 1
    return examples, report


def parse_sft(records, fmt: str = "auto", columns: dict | None = None, on_bad_row: str = "error") -> tuple[list[SFTExample], ParseReport]:
    """Records -> SFT examples (prompt/response, prompt/completion or chat messages)."""
    return _parse(records, fmt, columns, on_bad_row, SFT_FORMATS, "SFT")


def parse_preferences(records, fmt: str = "auto", columns: dict | None = None, on_bad_row: str = "error") -> tuple[list[PreferenceExample], ParseReport]:
    """Records -> preference pairs; ranked lists expand to all pairs with weight 1/num_pairs."""
    return _parse(records, fmt, columns, on_bad_row, PREFERENCE_FORMATS, "preference")


def parse_prompts(records, fmt: str = "auto", columns: dict | None = None, on_bad_row: str = "error") -> tuple[list[PromptExample], ParseReport]:
    """Records -> PPO prompts (plain text, or chat messages ending with a user turn)."""
    return _parse(records, fmt, columns, on_bad_row, PROMPT_FORMATS, "prompt")


def _load(parse: Callable, source, split: str, kw: dict):
    """Read and parse one source or a list of them (paths or SourceConfig), each with its own format, columns,
    template, weight and row limit (unset ones from `kw`); one log line per source when there are several."""
    from rlhf_ds.config import SourceConfig

    template, seed = kw.pop("template", None), kw.pop("seed", 0)
    sources = [s if isinstance(s, SourceConfig) else SourceConfig(path=str(s))
               for s in (source if isinstance(source, list) else [source])]
    examples, reports, joins = [], [], []
    for i, src in enumerate(sources):
        records = read_records(src.path, split=split)
        records = records[: src.limit] if src.limit else records
        if not records:
            raise DataError("no rows found", file=str(src.path))
        options = {**kw, **({"fmt": src.format} if src.format else {}),
                   **({"columns": src.columns} if src.columns is not None else {})}
        got, report = parse(records, **options)
        used = src.template if src.template is not None else template
        got = apply_template(got, used, src.path)
        joins.append((str(src.path), used, source_join(got)))
        for ex in got:
            if isinstance(ex, PreferenceExample):
                ex.group += sum(r.total for r in reports)  # rows of different sources are different groups
        got = resample(got, src.weight, seed + i)
        if len(sources) > 1:
            log.info("source %d of %d, %s: %s; weight %g -> %d examples", i + 1, len(sources), src.path,
                     report.summary(), src.weight, len(got))
        examples += got
        reports.append(report)
    warning = check_joins(joins)
    if warning:
        log.warning(warning)
    return examples, _combine(reports)


def _combine(reports: list[ParseReport]) -> ParseReport:
    total = ParseReport(fmt=", ".join(dict.fromkeys(f for r in reports for f in r.fmt.split(", "))))
    for r in reports:
        total.total, total.kept = total.total + r.total, total.kept + r.kept
        for reason, count in r.skipped.items():
            total.skipped[reason] = total.skipped.get(reason, 0) + count
    return total


def resample(examples: list, weight: float, seed: int) -> list:
    """A source's share of the mix: round(weight x n) examples, every example floor(weight) times plus a seeded sample
    (without replacement) for the fraction; weight 1 keeps the examples as they are."""
    if weight == 1 or not examples:
        return examples
    import numpy as np

    whole, n_extra = int(weight), round((weight - int(weight)) * len(examples))
    extra = np.random.default_rng(seed).permutation(len(examples))[:n_extra]
    return examples * whole + [examples[i] for i in sorted(extra)]


# ---- prompt templates --------------------------------------------------------------------------------------------


TEMPLATE_FIELDS = ("prompt", "question")
RESPONSE_FIELD = "response"  # a template's optional last field: where the response starts (`split_template`)
WHITESPACE = " \t\n\r\f\v"


def _template_fields(template: str, where: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise DataError(f"invalid template {template!r}: {err} (write literal braces as {{{{ and }}}})", file=where,
                        field="template") from None


def check_template(template: str, where: str) -> None:
    """A template names the prompt as {prompt} (or {question}) and may end with {response}; literal braces are
    written {{ and }}."""
    names = _template_fields(template, where)
    bad = [n for n in names if n not in (*TEMPLATE_FIELDS, RESPONSE_FIELD)]
    prompt_named = any(n in TEMPLATE_FIELDS for n in names)
    if bad or not prompt_named:
        raise DataError(f"template {template!r} must contain {{prompt}} (or {{question}}), may end with {{response}}, "
                        "and names no other field" + (f"; unknown: {', '.join(map(repr, bad))}" if bad else ""),
                        file=where, field="template")
    if RESPONSE_FIELD in names and (names.count(RESPONSE_FIELD) > 1 or not template.endswith("{response}")):
        raise DataError(f"template {template!r}: {{response}} may only be its very end, once (it marks where the "
                        "response starts)", file=where, field="template")


def split_template(template: str) -> tuple[str, str]:
    """(prompt template, response prefix) of a template. A template ending in {response} says how a response joins
    its prompt: the whitespace right before {response} starts the response instead of ending the prompt, so
    `"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"` renders the prompt `...\\n\\nAssistant:` and the response
    `" " + answer`: the same text and the same tokens at the join as an HH dialogue (`':'` then `'Ġit'`, where a
    template ending in `"Assistant: "` gives `':' 'Ġ'` then `'it'`). Without {response} the prefix is empty."""
    if not template.endswith("{response}"):  # (a literal "{{response}}" ends in "}}")
        return template, ""
    head = template[: -len("{response}")]
    prompt_part = head.rstrip(WHITESPACE)
    return prompt_part, head[len(prompt_part):]


def source_templates(source, template: str | None) -> list[str | None]:
    """The distinct prompt templates the sources of `source` (one, a list, or None = the built-in task) are rendered
    with, `template` standing in for sources that set none; None is the prompt as it is."""
    from rlhf_ds.config import SourceConfig

    sources = source if isinstance(source, list) else [source]
    used = {s.template if isinstance(s, SourceConfig) and s.template is not None else template for s in sources}
    return sorted(used, key=lambda t: (t is not None, t or ""))


def render_template(template: str | None, prompt: str) -> str:
    """The prompt text a model sees: `template` (up to the whitespace before a final {response}) with
    {prompt}/{question} replaced, or the prompt itself."""
    if template is None:
        return prompt
    return split_template(template)[0].format(**{name: prompt for name in TEMPLATE_FIELDS})


def apply_template(examples: list, template: str | None, where: str) -> list:
    """Render every plain prompt of `examples` with `template` (chats are rendered by the chat template instead);
    a template ending in {response} also starts every non-empty response with its prefix (`split_template`)."""
    if template is None:
        return examples
    check_template(template, str(where))
    if any(getattr(ex, "messages", None) is not None for ex in examples):
        raise DataError("a template renders plain prompts; chat (messages) rows are rendered with the tokenizer's "
                        "chat template, so leave the template unset for them", file=str(where), field="template")
    prefix = split_template(template)[1]
    for ex in examples:
        ex.prompt = render_template(template, ex.prompt)
        if prefix:  # an empty preference answer stays empty: [BOS] + prompt + [EOS]
            for key in ("response", "chosen", "rejected"):
                if getattr(ex, key, None):
                    setattr(ex, key, prefix + getattr(ex, key))
    return examples


# ---- how sources join prompt and response ------------------------------------------------------------------------


JOINS = {"prompt": "the whitespace ends the prompt", "response": "the whitespace starts the response",
         "both": "whitespace on both sides", "none": "no whitespace between them"}


def join_kind(prompt: str, response: str) -> str:
    """Where the whitespace between a prompt and its response lies, which decides the tokens at the join: "prompt"
    (`'Assistant: ' + 'it'`: `':' 'Ġ' | 'it'`), "response" (`'Assistant:' + ' it'`: `':' | 'Ġit'`, as HH dialogues),
    "both", or "none" (`'Assistant:it'`)."""
    before, after = prompt[-1:] in tuple(WHITESPACE), response[:1] in tuple(WHITESPACE)
    return "both" if before and after else "prompt" if before else "response" if after else "none"


def _responses(ex) -> list[str]:
    if isinstance(ex, PreferenceExample):
        return [ex.chosen, ex.rejected]
    if isinstance(ex, SFTExample) and ex.messages is None:
        return [ex.response]
    return []


def source_join(examples: list) -> tuple[str, str, str] | None:
    """The most common join of a source's plain prompts and non-empty responses, with one example of it (prompt,
    response); None when it has none (prompts only, chats)."""
    seen: dict[str, tuple[int, str, str]] = {}
    for ex in examples:
        if getattr(ex, "messages", None) is not None:
            continue
        for response in _responses(ex):
            if response:
                kind = join_kind(ex.prompt, response)
                count, p, r = seen.get(kind, (0, ex.prompt, response))
                seen[kind] = (count + 1, p, r)
    if not seen:
        return None
    kind = max(seen, key=lambda k: seen[k][0])
    return kind, seen[kind][1], seen[kind][2]


def _join_example(prompt: str, response: str) -> str:
    """"'...end of the prompt' + 'start of the resp...'"."""
    head = ("..." if len(prompt) > 14 else "") + prompt[-14:]
    tail = response[:10] + ("..." if len(response) > 10 else "")
    return f"{head!r} + {tail!r}"


def check_joins(joins: list[tuple[str, str | None, tuple[str, str, str] | None]]) -> str | None:
    """A warning (or None) about `joins`: (source path, its template, `source_join`) per source. Sources that join
    prompt and response differently give the model different tokens where an answer starts; a templated source that
    glues its answers to the prompt (`'Assistant:' + 'it'`) likely lacks a space."""
    known = [(path, template, join) for path, template, join in joins if join is not None]
    kinds = {join[0] for _, _, join in known}
    described = "; ".join(f"{path}: {_join_example(p, r)} ({JOINS[kind]})" for path, _, (kind, p, r) in known)
    hint = ("end a source's template with ' {response}' (e.g. \"\\n\\nHuman: {prompt}\\n\\nAssistant: {response}\") to "
            "start its responses with the space, as HH dialogues do (docs/data.md, Prompt templates)")
    if len(kinds) > 1:
        return (f"the data sources join prompt and response differently, so the model sees different tokens where an "
                f"answer starts: {described}; {hint}")
    glued = [f"{path}: template {template!r} joins prompt and response without whitespace ({_join_example(p, r)} "
             f"renders {(p[-10:] + r[:10])!r})" for path, template, (kind, p, r) in known
             if kind == "none" and template is not None]
    return f"{'; '.join(glued)}; if a space is meant, {hint}" if glued else None


def load_sft(source, split: str = "train", **kw) -> tuple[list[SFTExample], ParseReport]:
    """read_records + parse_sft for one source or a list; ``kw``: parse_sft's, plus ``template`` and ``seed``."""
    return _load(parse_sft, source, split, kw)


def load_preferences(source, split: str = "train", **kw) -> tuple[list[PreferenceExample], ParseReport]:
    """read_records + parse_preferences for one source or a list; ``kw``: parse_preferences's, plus ``template``, ``seed``."""
    return _load(parse_preferences, source, split, kw)


def load_prompts(source, split: str = "train", **kw) -> tuple[list[PromptExample], ParseReport]:
    """read_records + parse_prompts for one source or a list; ``kw``: parse_prompts's, plus ``template`` and ``seed``."""
    return _load(parse_prompts, source, split, kw)
