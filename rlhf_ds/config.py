"""Typed run configs: YAML file + `key.sub=value` overrides, validated on load, saved resolved into the run dir.

Every step has one dataclass (``PretrainConfig``, ``SFTConfig``, ``RMConfig``, ``PPOConfig``, ``PipelineConfig``). Shared
sections (``EngineConfig``, ``TrainConfig``, ``DataConfig``, ``TrackingConfig``) keep one meaning everywhere, and the
DeepSpeed JSON is derived from them (see ``rlhf_ds.engine.ds_config``) so batch sizes, precision and ZeRO stage have
one source of truth. Keys that name a pluggable component (``Registered``) are checked against its registry once the
config's ``plugins`` are imported.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot run: names the key and what is wrong."""


@dataclass(frozen=True)
class Registered:
    """Marks a key whose value names a registered component (rlhf_ds/registry.py); for a mapping, each of its keys.
    `where` is the registry as "module:attribute", imported only when the names are needed: the registries' modules
    import torch."""

    where: str

    def registry(self):
        module, _, attribute = self.where.partition(":")
        return getattr(importlib.import_module(module), attribute)


# keys naming registered components: plain text when read, checked once the config's plugins are imported
EstimatorName = Annotated[str, Registered("rlhf_ds.rl.advantages:ESTIMATORS")]
PreferenceLossName = Annotated[str, Registered("rlhf_ds.rl.preference:LOSSES")]
RolloutBackendName = Annotated[str, Registered("rlhf_ds.rollout.backends:BACKENDS")]
RewardSourceOptions = Annotated[dict[str, dict[str, Any]], Registered("rlhf_ds.rewards.base:SOURCES")]
EnvironmentName = Annotated[Optional[str], Registered("rlhf_ds.envs:ENVIRONMENTS")]


# --------------------------------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LoraConfig:
    enabled: bool = False  # train low-rank adapters instead of the full weights
    rank: int = 8  # adapter rank r
    alpha: float = 16.0  # adapter scale: updates are multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapters' input
    # None = pick per architecture (GPT-2: c_attn/c_proj/c_fc, LLaMA: q/k/v/o/gate/up/down projections)
    target_modules: Optional[list[str]] = None


@dataclass
class EngineConfig:
    """How one model runs on DeepSpeed. Each PPO role has its own."""

    zero_stage: int = 3  # 0 replicated; 1/2 shard optimizer states/gradients; 3 shards parameters too
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of weights and compute
    offload_optimizer: bool = False  # optimizer states and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # parameters on the CPU between uses (ZeRO-3 only)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more compute
    # log-probs and entropies from the last hidden states this many tokens at a time (the output projection and its
    # log-softmax recomputed in backward), so [batch, tokens, vocabulary] logits never exist whole; 0 = all at once
    logit_chunk_tokens: int = 1024
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"  # adamw, or adamw_8bit (bitsandbytes 8-bit optimizer states)
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW's (beta1, beta2)
    warmup_ratio: float = 0.05  # fraction of the optimizer steps with a linear learning-rate warmup
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"  # learning-rate decay after the warmup
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    lora: LoraConfig = field(default_factory=LoraConfig)
    # ZeRO-3: parameters with fewer elements than this stay whole on every rank instead of being gathered at every
    # forward (biases, norms, small heads). DeepSpeed's own default is 1e5; 1e4 (DeepSpeed-Chat's) measured the
    # faster PPO scoring phase here (benchmarks/README.md) and the planner counts the bytes it keeps per rank.
    zero3_param_persistence_threshold: int = 10000
    # ZeRO-1/2/3, trained: reduce gradients while backward runs; DeepSpeed-Chat's choice, a wash on CPU (benchmarks/)
    overlap_comm: bool = True
    # ZeRO-1/2/3, trained: gradient elements per reduce (a resident bucket); 5e6 ran faster than 5e7 here, 340 MB less
    reduce_bucket_size: int = 5_000_000
    allgather_bucket_size: int = 50_000_000  # ZeRO-1/2: elements per post-step all-gather (the former template value)
    # ZeRO-3: parameter elements gathered ahead of use; 5e6 scored faster than 5e7 here (GPU runs may want 3e7-5e7)
    zero3_prefetch_bucket_size: int = 5_000_000
    zero3_max_live_parameters: int = 1_000_000_000  # ZeRO-3: most gathered parameter elements per rank (DeepSpeed's)
    zero3_max_reuse_distance: int = 1_000_000_000  # ZeRO-3: keep gathered what is reused within N (DeepSpeed's)
    # a JSON file of DeepSpeed keys merged over the generated config (examples in ds_configs/); the merged config is
    # saved in the run directory. Keys the run config owns (batch sizes, stage, precision, offload, clipping, the ZeRO
    # knobs above) are refused there: set them here instead.
    ds_config: Optional[str] = None


@dataclass
class LoopConfig:
    """What every step's loop reads: seed, logging cadence, the non-finite-loss guard, the collective timeout."""

    log_every: int = 5  # metrics every N optimizer steps (PPO: iterations)
    seed: int = 1234  # seeds initialisation, data order and sampling (per rank)
    # a loss that is NaN/inf on any rank: "skip" drops that optimizer step on every rank (at most max_nonfinite_steps
    # in a run), "stop" ends the run with an error (checkpoints already written stay the last good ones)
    on_nonfinite_loss: Literal["skip", "stop"] = "skip"
    max_nonfinite_steps: int = 10  # with on_nonfinite_loss=skip: at most this many skipped steps in a run
    # how long a collective may wait for a peer before the job fails (NCCL's watchdog and gloo both use it)
    collective_timeout_minutes: float = 30.0


@dataclass
class TrainConfig(LoopConfig):
    """A supervised loop over a dataset (pretrain, SFT, RM): the loop keys plus batching, epochs and eval cadence."""

    micro_batch_size: int = 8  # per rank
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    epochs: int = 1  # passes over the training data
    max_steps: int = 0  # optimizer steps; 0 = run the epochs
    eval_every: int = 50  # evaluate every N optimizer steps (and at the end)
    eval_batch_size: int = 16  # per rank, for evaluation
    # padding-free: each micro-batch's sequences run as one row with position ids restarting per sequence and
    # attention kept within each sequence (a varlen kernel where the attention implementation has one); same losses
    packing: bool = False
    # > 0: micro-batches hold at most this many tokens (per rank) instead of micro_batch_size sequences; a step still
    # takes micro_batch_size x grad_accum x ranks sequences, and its loss is normalised over the whole step
    max_tokens_per_micro_batch: int = 0


@dataclass
class CheckpointConfig:
    """Full-state checkpoints (engines, optimizers, schedulers, RNGs, data position, metrics) for exact resume."""

    dir: Optional[str] = None  # None = <output_dir>/checkpoints
    every_steps: int = 0  # 0 = not by step count
    every_minutes: float = 30.0  # 0 = not by time; a SIGTERM/SIGUSR1 always saves before the job exits
    keep_last: int = 2  # complete checkpoints kept; older ones are removed
    # auto = continue from the newest complete checkpoint in `dir` when there is one; never = start afresh (existing
    # checkpoints in `dir` are removed); or the path of one checkpoint (a step_NNNNNNNN folder)
    resume: str = "auto"


@dataclass
class SourceConfig:
    """One data source of a list in `data.train` / `data.eval`; unset keys take the `data.*` value."""

    path: str = ""  # file, folder (save_to_disk or data files) or hub name
    format: Optional[str] = None  # None = data.format
    columns: Optional[dict[str, str]] = None  # None = data.columns
    template: Optional[str] = None  # None = data.template
    weight: float = 1.0  # sampling ratio: this source contributes round(weight x its examples) (seeded)
    limit: int = 0  # read only the first `limit` rows; 0 = all


DataSources = Union[str, list[Union[str, SourceConfig]], None]


@dataclass
class DataConfig:
    # a file, folder (save_to_disk) or hub name, or a list of them / of SourceConfig mappings; None = built-in task
    train: DataSources = None
    eval: DataSources = None  # held-out data, in the same forms as `train`; None = carved from `train` by eval_split
    # held out from `train` (seeded) when `eval` is not given: a fraction (0 < x < 1) or a count of examples; 0 = none
    eval_split: Union[int, float] = 0.05
    format: str = "auto"  # auto = detected from the columns (per file), or a format name (README: Data formats)
    # rename columns to the format's names, e.g. {question: prompt}
    columns: dict[str, str] = field(default_factory=dict)
    # how prompts are rendered, e.g. "Question: {question}\n\nAnswer: " ({prompt} or {question}: the row's prompt);
    # None = the prompt as it is (docs/data.md)
    template: Optional[str] = None
    # plain .txt corpora (pretraining, PPO-ptx): one document per "blank_line"-separated block, or per "line"
    text_documents: Literal["blank_line", "line"] = "blank_line"
    # a malformed row: error (exit 2 naming file, row and field) or skip (counted)
    on_bad_row: Literal["error", "skip"] = "error"
    # prompt tokens kept (BOS included); longer prompts follow prompt_overflow. null = the data's longest prompt
    # (within the model's positions)
    max_prompt_tokens: Optional[int] = None
    # prompt + response tokens; a longer response is cut (and loses its EOS). null = the data's longest example (PPO:
    # the prompt budget + generation.max_new_tokens), within the model's positions
    max_seq_len: Optional[int] = None
    # a prompt over max_prompt_tokens: truncate (keep its end) or drop the example
    prompt_overflow: Literal["truncate", "drop"] = "truncate"
    # the share of examples the budgets may cut (prompts over max_prompt_tokens, sequences over max_seq_len) before
    # the run is refused (exit 2, naming the key and the longest row); 1 = cut as many as the budgets say
    max_cut_share: float = 0.01


@dataclass
class TrackingConfig:
    wandb: bool = False  # log to Weights & Biases (WANDB_MODE=offline works without a network)
    wandb_project: str = "rlhf_ds"  # wandb project
    wandb_run_name: Optional[str] = None  # wandb run name; None = <output_dir name>-<step>
    wandb_group: Optional[str] = None  # wandb group (the pipeline puts its steps in one)
    wandb_tags: list[str] = field(default_factory=list)  # wandb tags
    tensorboard: bool = False  # also write TensorBoard events under <output_dir>/tensorboard


@dataclass
class BuiltinTaskConfig:
    seed: int = 0  # seed of the built-in task: its world, data and gold reward


# --------------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class StepConfig:
    """What every step's config has (the pipeline's too, which hands its list to each step)."""

    # modules that register components (advantage estimators, reward sources, rollout backends, preference losses):
    # "package.module" or "path/to/file.py" (relative to the working directory), imported in every process before the
    # config is checked (docs/architecture.md)
    plugins: list[str] = field(default_factory=list)


@dataclass
class ArchConfig:
    """A small causal LM built from scratch (step 0)."""

    type: Literal["gpt2", "llama"] = "gpt2"  # architecture family of the new model
    n_layers: int = 4  # transformer blocks
    hidden: int = 128  # hidden size
    n_heads: int = 4  # attention heads
    intermediate: int = 0  # 0 = 4 * hidden
    max_positions: int = 128  # context length (position embeddings)
    vocab_size: int = 640  # byte-level BPE vocabulary to train (256 bytes + 3 special tokens + merges)


@dataclass
class PretrainConfig(StepConfig):
    output_dir: str = "runs/pretrain"  # run directory: model/, checkpoints/, logs/, metrics.jsonl, results.json
    arch: ArchConfig = field(default_factory=ArchConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(max_seq_len=64))
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lr=2e-3, zero_stage=0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(micro_batch_size=32, epochs=6))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)


@dataclass
class SFTConfig(StepConfig):
    output_dir: str = "runs/sft"  # run directory: model/, checkpoints/, logs/, metrics.jsonl, results.json
    model: str = "runs/pretrain"  # local from_pretrained folder, or a step run dir holding model/
    trust_remote_code: bool = False  # run model code shipped inside a checkpoint folder (off: safe default)
    loss_on_prompt: bool = False  # also train on the prompt tokens (default: the response tokens only)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lr=5e-4))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)


STEP_CONFIGS: dict[str, type] = {"pretrain": PretrainConfig, "sft": SFTConfig}


def register_step_config(name: str, cls: type) -> type:
    STEP_CONFIGS[name] = cls
    return cls


# --------------------------------------------------------------------------------------------------------------------
# Loading, overrides, validation
# --------------------------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# a number as YAML 1.2 writes it; PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string
_DECIMAL = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_NONFINITE = re.compile(r"[-+]?\.?(nan|inf|infinity)", re.IGNORECASE)


def _describe(tp: Any) -> str:
    """What a value of annotation `tp` looks like, in the words of an error message."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is list:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Literal:
        return f"one of {list(typing.get_args(tp))}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, _type_name(tp))


def _same_kind(value: Any, tp: Any) -> bool:
    """Whether `value` is the kind of thing `tp` holds (a mapping for a section, a list for a list, a number or text for a
    number ...), so that of a Union's members the one the user meant reports the error."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) or origin is dict:
        return isinstance(value, dict)
    if origin is list:
        return isinstance(value, list)
    if tp in (int, float):
        return not isinstance(value, (bool, dict, list))
    if tp is str or origin is Literal:
        return isinstance(value, str)
    return False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only what is lossless (int -> float, dict -> dataclass,
    a YAML 1.2 number PyYAML left as text -> float). Every error names the full key path (`data.train[0].weight`).

    A float must be finite, for every float key: NaN passes every `x <= 0` check after it, and no key gives nan or
    inf a meaning ("off" is 0 or null wherever a key has it)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append((arg, str(e)))
        meant = [e for arg, e in errors if _same_kind(value, arg)]
        if meant:  # e.g. a mapping in a list of sources: the source's own error, naming its key
            raise ConfigError(meant[-1])  # int or float: the float's (the wider) error
        if len(errors) == 1:
            raise ConfigError(errors[0][1])
        raise ConfigError(f"{key}: {value!r} is none of: {', '.join(_describe(a) for a in args)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section '{key}', got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()} if args else value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and (_DECIMAL.fullmatch(value.strip()) or _NONFINITE.fullmatch(value.strip())):
            value = float(value.strip().replace(".nan", "nan").replace(".inf", "inf"))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.copysign(math.inf, value)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: {number} is not a finite number")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {_type_name(tp)}")  # a bug in a config dataclass


def _build(cls: type, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, names, n=1)
        hint = f" (did you mean '{prefix + close[0]}'?)" if close else f" (known: {', '.join(names)})"
        raise ConfigError(f"unknown config key '{prefix + k}'{hint}")
    default = cls()
    kwargs = {}
    for name in names:
        if name in raw:
            sub_default = getattr(default, name)
            value = raw[name]
            if dataclasses.is_dataclass(sub_default) and isinstance(value, dict):
                # merge into the step's own defaults for the section, not the section class's
                value = deep_merge(dataclasses.asdict(sub_default), value)
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    return dataclasses.replace(default, **kwargs)


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else v
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`engine.lr=1e-4` -> ('engine.lr', 0.0001). Values are read as YAML so types come out right."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and value.strip().lower() in {"none", "null"}:
        value = None
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads `1e-4` as a string
    return key, value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return any(c in s.lower() for c in "e.") and not s.strip().lower() in {"inf", "nan", "-inf"}


def load_config(step: str, path: Optional[str] = None, overrides: Optional[list[str]] = None):
    """Build and validate the config of `step` from an optional YAML file and `key=value` overrides."""
    if step not in STEP_CONFIGS:
        raise ConfigError(f"unknown step '{step}' (known: {', '.join(STEP_CONFIGS)})")
    raw: dict = {}
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                raw = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    cfg = _build(STEP_CONFIGS[step], raw)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Combinations that cannot work, caught before any process group or model exists. The config's plugins are
    imported first, so that the names of the components they register are known."""
    from rlhf_ds.registry import load_plugins  # lazy: the registry module imports this one

    load_plugins(cfg.plugins)
    check_registered(cfg)
    for name, eng in _engines(cfg):
        validate_engine(name, eng)
    train = getattr(cfg, "train", None)
    if train is not None:
        batching = ("micro_batch_size", "grad_accum", "epochs", "eval_batch_size") if isinstance(train, TrainConfig) else ()
        for k in ("log_every", *batching):
            if getattr(train, k) <= 0:
                raise ConfigError(f"train.{k} must be > 0, got {getattr(train, k)}")
        if getattr(train, "max_steps", 0) < 0 or getattr(train, "max_tokens_per_micro_batch", 0) < 0:
            raise ConfigError("train.max_steps and train.max_tokens_per_micro_batch must be >= 0")
        if train.max_nonfinite_steps < 0 or train.collective_timeout_minutes <= 0:
            raise ConfigError("train.max_nonfinite_steps must be >= 0 and train.collective_timeout_minutes > 0")
    ckpt = getattr(cfg, "checkpoint", None)
    if ckpt is not None:
        if ckpt.every_steps < 0 or ckpt.every_minutes < 0 or ckpt.keep_last < 1:
            raise ConfigError("checkpoint.every_steps and every_minutes must be >= 0 and checkpoint.keep_last >= 1")
        if not ckpt.resume:
            raise ConfigError("checkpoint.resume must be auto, never or the path of a checkpoint")
    data = getattr(cfg, "data", None)
    if data is not None:
        if data.max_prompt_tokens is not None and data.max_seq_len is not None and \
                data.max_prompt_tokens >= data.max_seq_len and not isinstance(cfg, PretrainConfig):
            raise ConfigError(
                f"data.max_prompt_tokens ({data.max_prompt_tokens}) must be < data.max_seq_len ({data.max_seq_len}) "
                "to leave room for a response"
            )
        validate_data(data)
    if isinstance(cfg, PretrainConfig) and cfg.data.max_seq_len is None:
        raise ConfigError("data.max_seq_len: pretraining needs a block length (tokens per packed block)")
    if isinstance(cfg, PretrainConfig) and cfg.arch.vocab_size < 259:
        raise ConfigError(f"arch.vocab_size must be >= 259 (256 byte symbols + PAD/BOS/EOS of the byte-level "
                          f"tokenizer), got {cfg.arch.vocab_size}")
    extra = getattr(cfg, "validate", None)
    if callable(extra):
        extra()


def check_registered(section, prefix: str = "") -> None:
    """Every key marked `Registered` names a registered component; the error lists the registered names. A step's
    section of the pipeline is left to that step's own validation, after its own plugins."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, StepConfig):
            continue
        if dataclasses.is_dataclass(value):
            check_registered(value, f"{prefix}{f.name}.")
        for mark in getattr(hints[f.name], "__metadata__", ()):
            if value is None:  # an optional component left out
                continue
            registry = mark.registry()
            for name in value if isinstance(value, dict) else [value]:
                try:
                    registry.get(name)
                except ValueError as e:
                    raise ConfigError(f"{prefix}{f.name}: {e}") from None


def validate_data(data: DataConfig) -> None:
    """The data section alone. How many examples `eval_split` may hold out depends on the data: counted once it is read,
    before any model loads (rlhf_ds.steps.common.split_eval)."""
    for key in ("max_prompt_tokens", "max_seq_len"):
        if getattr(data, key) is not None and getattr(data, key) < 2:
            raise ConfigError(f"data.{key} must be >= 2 (or null: from the data), got {getattr(data, key)}")
    if not 0 <= data.max_cut_share <= 1:
        raise ConfigError(f"data.max_cut_share must be in [0, 1], got {data.max_cut_share}")
    split = data.eval_split
    if split < 0 or (isinstance(split, float) and split >= 1):
        raise ConfigError(f"data.eval_split must be a fraction in [0, 1) or a count >= 1, got {split}")
    for key in ("train", "eval"):
        value = getattr(data, key)
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"data.{key}: an empty list of sources")
            for i, src in enumerate(value):
                if not isinstance(src, SourceConfig):
                    continue
                where = f"data.{key}[{i}]"
                if not src.path:
                    raise ConfigError(f"{where}.path: a source needs a path")
                if not src.weight > 0:
                    raise ConfigError(f"{where}.weight must be > 0, got {src.weight}")
                if src.limit < 0:
                    raise ConfigError(f"{where}.limit must be >= 0, got {src.limit}")


def validate_engine(name: str, eng: EngineConfig) -> None:
    if eng.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"{name}.zero_stage must be 0, 1, 2 or 3, got {eng.zero_stage}")
    if eng.offload_params and eng.zero_stage != 3:
        raise ConfigError(f"{name}.offload_params needs zero_stage 3 (DeepSpeed offloads parameters only in ZeRO-3)")
    if eng.offload_optimizer and eng.zero_stage == 0:
        raise ConfigError(f"{name}.offload_optimizer needs zero_stage >= 1")
    if eng.lr <= 0:
        raise ConfigError(f"{name}.lr must be > 0, got {eng.lr}")
    if eng.logit_chunk_tokens < 0:
        raise ConfigError(f"{name}.logit_chunk_tokens must be >= 0 (0 = all tokens at once), got {eng.logit_chunk_tokens}")
    if not 0 <= eng.warmup_ratio < 1:
        raise ConfigError(f"{name}.warmup_ratio must be in [0, 1), got {eng.warmup_ratio}")
    if len(eng.adam_betas) != 2:
        raise ConfigError(f"{name}.adam_betas must have two values")
    if not all(0 <= b < 1 for b in eng.adam_betas):
        raise ConfigError(f"{name}.adam_betas must be two values in [0, 1), got {eng.adam_betas}")
    if eng.weight_decay < 0:
        raise ConfigError(f"{name}.weight_decay must be >= 0, got {eng.weight_decay}")
    if eng.grad_clip < 0:
        raise ConfigError(f"{name}.grad_clip must be >= 0 (0 = no clipping), got {eng.grad_clip}")
    if eng.lora.enabled and eng.lora.rank <= 0:
        raise ConfigError(f"{name}.lora.rank must be > 0")
    if eng.lora.alpha <= 0:
        raise ConfigError(f"{name}.lora.alpha must be > 0, got {eng.lora.alpha}")
    if not 0 <= eng.lora.dropout < 1:
        raise ConfigError(f"{name}.lora.dropout must be in [0, 1), got {eng.lora.dropout}")
    if eng.zero3_param_persistence_threshold < 0:
        raise ConfigError(f"{name}.zero3_param_persistence_threshold must be >= 0")
    for key in ("reduce_bucket_size", "allgather_bucket_size", "zero3_prefetch_bucket_size",
                "zero3_max_live_parameters", "zero3_max_reuse_distance"):
        if getattr(eng, key) <= 0:
            raise ConfigError(f"{name}.{key} must be > 0 (elements), got {getattr(eng, key)}")
    if eng.ds_config is not None:
        from rlhf_ds.engine.ds_config import read_user_ds_config  # lazy: it imports torch

        read_user_ds_config(eng.ds_config)


def validate_generation(name: str, gen: "GenerationConfig") -> None:
    if not 0 < gen.top_p <= 1:
        raise ConfigError(f"{name}.top_p must be in (0, 1], got {gen.top_p}")
    if gen.top_k < 0:
        raise ConfigError(f"{name}.top_k must be >= 0 (0 = off), got {gen.top_k}")


def validate_frozen_engine(name: str, eng: EngineConfig) -> None:
    """An inference-only engine has no optimizer: ZeRO stages 1 and 2 partition optimizer states and gradients only,
    and DeepSpeed refuses them without an optimizer ('zero stage 2 requires an optimizer')."""
    validate_engine(name, eng)
    if eng.zero_stage in (1, 2):
        raise ConfigError(f"{name}.zero_stage is {eng.zero_stage}, but this model is frozen (no optimizer): use 3 to "
                          "shard it or 0 to keep a whole copy per rank")


def _engines(cfg) -> list[tuple[str, EngineConfig]]:
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, EngineConfig):
            out.append((f.name, v))
    return out


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str) -> None:
    """Write the resolved config (all defaults filled in; a config object or its `to_dict`) atomically."""
    from rlhf_ds.utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg if isinstance(cfg, dict) else to_dict(cfg), sort_keys=False))


@dataclass
class RMConfig(StepConfig):
    output_dir: str = "runs/rm"  # run directory: model/, checkpoints/, logs/, metrics.jsonl, results.json
    model: str = "runs/sft"  # backbone: any local causal-LM folder (SFT output, a base model, another architecture)
    trust_remote_code: bool = False  # run model code shipped inside a checkpoint folder (off: safe default)
    # offset (and gain) stored with the model so the mean score of this reference set is 0 (and its std 1 with gain):
    # "chosen" = the chosen responses of the evaluation pairs (of the training pairs when none are held out: logged, and
    # recorded as normalize_pairs in results.json and scalar_head.json), "none" = keep raw scores
    normalize_on: Literal["chosen", "none"] = "chosen"
    normalize_gain: bool = False  # also scale the scores to std 1 on the reference set
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lr=1e-3))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, eval_every=100))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)


register_step_config("rm", RMConfig)


@dataclass
class RoleConfig:
    """One of PPO's four models: where it loads from and how its DeepSpeed engine runs."""

    model: Optional[str] = None  # model folder or step run dir; None = the role's default
    engine: EngineConfig = field(default_factory=EngineConfig)


DEFAULT_REWARD_MODEL = "runs/rm"


@dataclass
class RewardConfig(RoleConfig):
    """Step 3's reward: a weighted sum of the sources given (at least one); rlhf_ds/rewards/ has one file per kind."""

    function: Optional[str] = None  # Python reward "package.module:function" or "path/file.py:function"
    url: Optional[str] = None  # a reward model served by `rlhf-ds serve-reward`, e.g. http://127.0.0.1:8000
    # reward sources registered by plugins, each with its options: {name: {option: value}} (docs/architecture.md)
    registered: RewardSourceOptions = field(default_factory=dict)
    # source ("model", "function", "remote" or a registered name) -> weight; missing = 1.0
    weights: dict[str, float] = field(default_factory=dict)
    timeout_s: float = 30.0  # remote: seconds to wait for one answer
    retries: int = 3  # remote: attempts after the first one fails (connection refused, timeout, HTTP 5xx)
    backoff_s: float = 1.0  # remote: first wait between attempts; doubles each retry
    batch_size: int = 64  # remote: responses per request
    # remote: a file holding the shared secret that `rlhf-ds serve-reward --token-file` expects (sent as a bearer token)
    token_file: Optional[str] = None

    def sources(self) -> list[str]:
        """The reward sources given, as the names `weights` uses."""
        return [name for name, given in (("model", self.model), ("function", self.function), ("remote", self.url))
                if given] + list(self.registered)


@dataclass
class GenerationConfig:
    max_new_tokens: int = 24  # response tokens at most
    do_sample: bool = True  # sample (else greedy decoding)
    temperature: float = 1.0  # every later log-prob evaluation divides logits by the same T
    top_k: int = 0  # sample among the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens with this mass (1 = off)


@dataclass
class HybridConfig:
    # portable (hook-free copy synced from the shards, any device), deepspeed (DeepSpeed's CUDA engine), or a backend a
    # plugin registers
    backend: RolloutBackendName = "portable"
    gather_group_size: int = 32  # parameter tensors gathered at once when syncing the generation copy
    keep_copy: bool = True  # keep the unsharded generation copy between rollouts (else free it each time)
    # ranks of one node that decode together, each holding a tensor-parallel slice of the generation copy (1 = whole)
    tp_size: int = 1
    # decoding of the portable engine: hf (HF generate, dynamic KV cache) or static_compile (static KV cache + torch.compile
    # CUDA graphs of the decoding step; CUDA only, falls back to hf with a warning for unsupported families)
    decode: Literal["hf", "static_compile"] = "hf"


@dataclass
class RolloutConfig:
    # a registered multi-turn environment (rlhf_ds/envs/; built in: tool_use) the policy takes turns with; None:
    # single-turn rollouts
    environment: EnvironmentName = None
    environment_options: dict[str, Any] = field(default_factory=dict)  # passed to the environment's factory
    max_turns: int = 4  # model turns per episode at most (each up to generation.max_new_tokens)
    # tokens after the prompt (model and environment) per episode; 0 = 2 x max_turns x generation.max_new_tokens (the
    # model's turns, and as much again for what the environment inserts)
    max_total_tokens: int = 0
    tool_timeout_s: float = 5.0  # seconds a tool may run before its call is answered with a timeout


@dataclass
class PPOAlgoConfig:
    steps: int = 60  # PPO iterations (rollout + update)
    rollout_batch_size: int = 16  # prompts per rank per iteration
    # how advantages are estimated (rlhf_ds/rl/advantages.py): gae (PPO, trains a critic), or critic-free grpo (group
    # mean/std), dr_grpo (group mean), rloo (leave-one-out), reinforce_pp (REINFORCE++), reinforce_pp_baseline, or an
    # estimator a plugin registers
    advantage_estimator: EstimatorName = "gae"
    n_samples_per_prompt: int = 1  # responses sampled per prompt (a group, kept on one rank); > 1 for group estimators
    micro_batch_size: int = 8  # per rank, for scoring and training forward passes
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    packing: bool = False  # padding-free scoring and training forwards (train.packing)
    ppo_epochs: int = 2  # passes over each rollout batch
    # on-policy updates (ppo_epochs 1, one optimizer step per rollout, kl_coef 0) take the old log-probs from their own
    # forward (detached, as TRL's GRPO does) instead of a separate pass after the rollout; false: always that pass
    old_logprobs_from_update: bool = True
    kl_coef: float = 0.1  # beta of the KL in the reward (DeepSpeed-Chat: 0.1); 0 disables it (e.g. GRPO with kl_loss_coef)
    # per-token KL: k1 log-ratio, k2 squared log-ratio / 2, k3 ratio - 1 - log-ratio
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_controller: Literal["fixed", "adaptive"] = "fixed"  # fixed beta, or adaptive (moves beta towards kl_target)
    kl_target: float = 6.0  # adaptive controller: target KL per sequence (nats)
    kl_horizon: int = 10000  # adaptive controller: horizon in samples
    kl_loss_coef: float = 0.0  # KL to the reference as a loss term instead of (or besides) in the reward (GRPO: 0.001)
    kl_loss_estimator: Literal["k1", "k2", "k3"] = "k3"  # per-token estimate used by the KL loss
    # the KL loss's per-token log-ratio is clamped to +-this before the estimate (k3 grows as exp(-log-ratio): at -25
    # 7.2e10 per token, inf below -88 in fp32; at the clamp e^10 - 11 = 22015); null = no clamp. The peers bound the
    # same term by 10 elsewhere (OpenRLHF: the estimate; verl: the log-ratio at 20, then the k3 value at 10), so their
    # figures differ beyond a log-ratio of 10
    kl_loss_log_ratio_clip: Optional[float] = 10.0
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE lambda
    clip_eps: float = 0.2  # PPO clip range of the probability ratio
    clip_eps_low: Optional[float] = None  # lower clip range (ratio >= 1 - clip_eps_low); null = clip_eps
    clip_eps_high: Optional[float] = None  # upper clip range (ratio <= 1 + clip_eps_high; DAPO: 0.28); null = clip_eps
    # dual-clip PPO: for negative advantages the policy loss is at most dual_clip x |advantage| per token (a constant
    # > 1; verl's default 3.0); null = off
    dual_clip: Optional[float] = None
    # how the per-token policy loss is averaged: token-mean, seq-mean-token-sum, seq-mean-token-mean, or Dr. GRPO's
    # seq-mean-token-sum-norm (token sum over a constant: generation.max_new_tokens)
    loss_agg_mode: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    value_clip: Optional[float] = 0.2  # null disables value clipping
    vf_coef: float = 1.0  # weight of the value loss
    whiten_rewards: bool = False  # normalise the rewards within the batch before GAE
    whiten_advantages: bool = True  # gae: normalise the advantages (mean 0, std 1) within the batch
    whiten_scope: Literal["rank", "global"] = "rank"  # whiten over this rank's rollout or over all ranks' together
    group_std_eps: float = 1e-6  # grpo: added to the group's standard deviation
    score_clip: Optional[float] = None  # clip the RM score to +-score_clip
    # added to the score of responses with no EOS; null disables; auto: -1 when the reward is a reward model alone
    # (InstructGPT / DeepSpeed-Chat), none when a function, a server or a plugin source scores (a -1 would outweigh a
    # 0/1 task reward) or when overlong shaping is on
    missing_eos_penalty: Union[float, Literal["auto"], None] = "auto"
    # DAPO's overlong shaping, opt-in: a response longer than generation.max_new_tokens - overlong_buffer tokens loses
    # overlong_penalty_factor x (its excess / overlong_buffer), the full factor at max_new_tokens; 0 = off
    overlong_buffer: int = 0
    overlong_penalty_factor: float = 1.0  # the overlong penalty at generation.max_new_tokens (DAPO: 1.0)
    # warn when the task reward (the reward sources before penalties and KL) has not varied within any group (or
    # within the rollout, for estimators without groups) for this many steps in a row: the update then comes only from
    # the penalties and the KL; 0 disables
    no_signal_patience: int = 3
    # DAPO's dynamic sampling for group estimators: groups whose task rewards are all equal carry no gradient; they
    # are dropped and each rank samples further prompts (rollout_batch_size at a time, from its own stream of the data)
    # until its rollout holds rollout_batch_size groups with signal, or dynamic_sampling_max_rounds extra rounds are
    # spent (then the rollout is filled up with dropped groups, and ppo/ds_filled_groups says how many). Rank-local: no
    # collective between rounds
    dynamic_sampling: bool = False
    dynamic_sampling_max_rounds: int = 4  # extra sampling rounds per step at most (>= 1)
    ptx_coef: float = 0.0  # PPO-ptx: InstructGPT used 27.8 (with its own loss scales)
    ptx_data: Optional[str] = None  # text corpus for ptx; None = the built-in task's pretraining corpus
    ema_decay: float = 0.0  # > 0 keeps an EMA copy of the actor (saved as ema/), e.g. 0.992
    # collapse warning: the fraction of distinct responses in a rollout below `collapse_distinct_below`, or of distinct
    # word bigrams below `collapse_distinct2_below`, for `collapse_patience` steps in a row (patience 0 disables it)
    collapse_distinct_below: float = 0.3
    collapse_distinct2_below: float = 0.3  # the same warning for the fraction of distinct word bigrams
    collapse_patience: int = 5  # steps in a row below a threshold before the warning before the warning
    # held-out prompts (data.eval or data.eval_split) are evaluated at the end and every `eval_every` steps (0 = end only)
    eval_every: int = 0


@dataclass
class PPOConfig(StepConfig):
    output_dir: str = "runs/ppo"  # run directory: model/, critic/, checkpoints/, logs/, metrics.jsonl, results.json
    actor: RoleConfig = field(default_factory=lambda: RoleConfig("runs/sft", EngineConfig(lr=5e-5, warmup_ratio=0.0, lr_schedule="constant")))
    # built only for advantage_estimator=gae; None = the reward model (the actor when there is none or it reads other ids)
    critic: RoleConfig = field(default_factory=lambda: RoleConfig(None, EngineConfig(lr=1e-4, warmup_ratio=0.0, lr_schedule="constant")))
    # model None = the actor's initial weights: with actor.engine.lora on, the actor's base with its adapters off (no
    # second copy); set reference.model for a separate frozen copy
    reference: RoleConfig = field(default_factory=RoleConfig)
    # model, function and/or url; a rule or remote reward alone: reward.model=null
    reward: RewardConfig = field(default_factory=lambda: RewardConfig(DEFAULT_REWARD_MODEL, EngineConfig()))
    trust_remote_code: bool = False  # run model code shipped inside a checkpoint folder (off: safe default)
    ppo: PPOAlgoConfig = field(default_factory=PPOAlgoConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(eval_split=0))
    train: LoopConfig = field(default_factory=lambda: LoopConfig(log_every=1))  # batching is in `ppo`
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)

    def _check_dynamic_sampling(self, estimator) -> None:
        """Dynamic sampling needs groups, and rounds that each rank can run alone (no collective in decoding or
        scoring)."""
        p = self.ppo
        if not estimator.needs_groups:
            raise ConfigError(f"ppo.dynamic_sampling drops groups of equal rewards, but ppo.advantage_estimator="
                              f"{p.advantage_estimator} has no groups (use grpo, dr_grpo, rloo or "
                              "reinforce_pp_baseline)")
        if p.dynamic_sampling_max_rounds < 1:
            raise ConfigError(f"ppo.dynamic_sampling_max_rounds is {p.dynamic_sampling_max_rounds}: a cap of extra "
                              "sampling rounds must be >= 1 (set ppo.dynamic_sampling=false to sample once)")
        h = self.hybrid
        if h.tp_size > 1 or h.backend != "portable" or not h.keep_copy:
            raise ConfigError("ppo.dynamic_sampling decodes its extra rounds on each rank alone with the copy synced "
                              "for the step: it needs hybrid.tp_size=1, hybrid.backend=portable and "
                              "hybrid.keep_copy=true")
        if self.reward.model and self.reward.engine.zero_stage == 3:
            raise ConfigError("ppo.dynamic_sampling scores its extra rounds on each rank alone, but a ZeRO-3 reward "
                              "model's forward is collective: set reward.engine.zero_stage=0 (or use reward.function "
                              "/ reward.url)")

    def _check_registered_sources(self) -> None:
        """reward.registered: no built-in source's name (reward.weights could not tell them apart), and options that
        the source's factory takes, so that a typo fails here rather than on every rank after the models load."""
        from rlhf_ds.rewards.base import SOURCES

        for name, options in self.reward.registered.items():
            if name in ("model", "function", "remote", "environment"):
                raise ConfigError(f"reward.registered.{name}: {name!r} is a built-in source's name (model, function, "
                                  "remote, environment); register the plugin's source under another name")
            try:
                inspect.signature(SOURCES.get(name)).bind(**options)
            except TypeError as e:
                raise ConfigError(f"reward.registered.{name}: options {sorted(options)} do not fit the source's "
                                  f"factory: {e}") from None

    def response_tokens(self) -> int:
        """Tokens after the prompt at most: a single turn, or an episode of `rollout`."""
        ro = self.rollout
        if ro.environment is None:
            return self.generation.max_new_tokens
        return ro.max_total_tokens or 2 * ro.max_turns * self.generation.max_new_tokens

    def _check_environment(self) -> None:
        """Episodes whose turn counts differ per rank need a rank-local `generate`, and options the factory takes."""
        from rlhf_ds.envs import ENVIRONMENTS

        ro, h = self.rollout, self.hybrid
        if ro.max_turns < 1 or ro.max_total_tokens < 0 or not ro.tool_timeout_s > 0:
            raise ConfigError("rollout.max_turns must be >= 1, rollout.max_total_tokens >= 0 (0: 2 x max_turns x "
                              "generation.max_new_tokens) and rollout.tool_timeout_s > 0")
        if h.tp_size > 1 or h.backend == "deepspeed":
            raise ConfigError(f"rollout.environment={ro.environment}: episodes take different numbers of turns on "
                              "each rank, but this engine decodes collectively (hybrid.tp_size > 1 or "
                              "hybrid.backend=deepspeed); use hybrid.tp_size=1 with a rank-local backend")
        factory = ENVIRONMENTS.get(ro.environment)
        try:
            inspect.signature(factory).bind(**ro.environment_options)
        except TypeError as e:
            raise ConfigError(f"rollout.environment_options {sorted(ro.environment_options)} do not fit environment "
                              f"{ro.environment!r}: {e}") from None
        except ValueError:  # a factory without an inspectable signature: its own errors will say
            pass

    def validate(self) -> None:
        from rlhf_ds.rl.advantages import get_estimator

        p, r = self.ppo, self.reward
        if self.actor.model is None:
            raise ConfigError("ppo needs actor.model (the SFT output)")
        if self.rollout.environment is not None:
            self._check_environment()
        if not r.sources() and self.rollout.environment is None:
            raise ConfigError("ppo needs a reward: reward.model (a reward model folder, default runs/rm), "
                              "reward.function (package.module:function or file.py:function), reward.url (a "
                              "reward model served by `rlhf-ds serve-reward`), reward.registered (sources "
                              "plugins register) and/or rollout.environment (its episodes' rewards)")
        alone = r.function or r.url or r.registered or self.rollout.environment
        if r.model == DEFAULT_REWARD_MODEL and alone and not os.path.exists(r.model):
            raise ConfigError(f"reward.model is {DEFAULT_REWARD_MODEL} (the default), which does not exist; to use "
                              "reward.function / reward.url / reward.registered alone set reward.model=null (so too "
                              "for the rewards of rollout.environment alone)")
        if r.function:
            from rlhf_ds.rewards.function import load_function

            load_function(r.function)  # import it now: a typo fails before any rank starts
        self._check_registered_sources()
        sources = r.sources() + (["environment"] if self.rollout.environment else [])
        if set(r.weights) - set(sources):
            raise ConfigError(f"reward.weights names {sorted(r.weights)}, but the reward sources given are "
                              f"{sources} (names: model, function, remote, environment (with rollout.environment), "
                              "or a reward.registered name)")
        if r.timeout_s <= 0 or r.retries < 0 or r.backoff_s < 0 or r.batch_size < 1:
            raise ConfigError("reward.timeout_s and reward.batch_size must be > 0, reward.retries and "
                              "reward.backoff_s >= 0")
        if r.token_file:
            if not r.url:
                raise ConfigError("reward.token_file is the token for a reward server (reward.url), but reward.url is "
                                  "not set")
            from rlhf_ds.rewards.server import read_token_file

            read_token_file(r.token_file, "reward.token_file")  # readable and well-formed before any rank starts
        estimator = get_estimator(p.advantage_estimator)
        if p.n_samples_per_prompt < 1:
            raise ConfigError("ppo.n_samples_per_prompt must be >= 1")
        if estimator.needs_groups and p.n_samples_per_prompt < 2:
            raise ConfigError(f"ppo.advantage_estimator={p.advantage_estimator} compares the responses to one prompt: "
                              "set ppo.n_samples_per_prompt >= 2 (e.g. 4 or 8)")
        if not estimator.needs_critic and self.critic.model is not None:
            raise ConfigError(f"ppo.advantage_estimator={p.advantage_estimator} trains no critic, but critic.model is "
                              "set; remove it or use advantage_estimator=gae")
        if p.missing_eos_penalty not in (None, "auto") and p.missing_eos_penalty > 0:
            raise ConfigError(f"ppo.missing_eos_penalty is {p.missing_eos_penalty}: a penalty must be <= 0 (it is "
                              "added to the score of responses that never end)")
        if not 0 <= p.overlong_buffer < self.generation.max_new_tokens or p.overlong_penalty_factor < 0:
            raise ConfigError(f"ppo.overlong_buffer ({p.overlong_buffer}) must be in 0..generation.max_new_tokens - 1 "
                              f"({self.generation.max_new_tokens - 1}) and ppo.overlong_penalty_factor >= 0")
        if p.no_signal_patience < 0:
            raise ConfigError("ppo.no_signal_patience must be >= 0")
        if p.dynamic_sampling:
            self._check_dynamic_sampling(estimator)
        if p.kl_coef < 0 or p.kl_loss_coef < 0:
            raise ConfigError("ppo.kl_coef and ppo.kl_loss_coef must be >= 0")
        for name in ("clip_eps", "clip_eps_low", "clip_eps_high", "kl_loss_log_ratio_clip"):
            if getattr(p, name) is not None and not getattr(p, name) > 0:
                raise ConfigError(f"ppo.{name} must be > 0, got {getattr(p, name)}")
        if p.dual_clip is not None and not p.dual_clip > 1:
            raise ConfigError(f"ppo.dual_clip must be > 1 (verl: 3.0) or null, got {p.dual_clip}")
        if (p.rollout_batch_size * p.n_samples_per_prompt) % (p.micro_batch_size * p.grad_accum):
            raise ConfigError(f"ppo.rollout_batch_size x ppo.n_samples_per_prompt ({p.rollout_batch_size} x "
                              f"{p.n_samples_per_prompt} responses per rank) must be a multiple of "
                              f"ppo.micro_batch_size x ppo.grad_accum ({p.micro_batch_size} x {p.grad_accum})")
        if self.generation.temperature <= 0:
            raise ConfigError("generation.temperature must be > 0")
        validate_generation("generation", self.generation)
        for name in ("gamma", "lam"):
            if not 0 <= getattr(p, name) <= 1:
                raise ConfigError(f"ppo.{name} must be in [0, 1], got {getattr(p, name)}")
        for name in ("vf_coef", "ptx_coef", "group_std_eps"):
            if getattr(p, name) < 0:
                raise ConfigError(f"ppo.{name} must be >= 0, got {getattr(p, name)}")
        for name in ("score_clip", "value_clip"):
            if getattr(p, name) is not None and not getattr(p, name) > 0:
                raise ConfigError(f"ppo.{name} must be > 0 or null, got {getattr(p, name)}")
        if p.kl_controller == "adaptive" and (p.kl_target <= 0 or p.kl_horizon <= 0):
            raise ConfigError(f"ppo.kl_target and ppo.kl_horizon must be > 0, got {p.kl_target} and {p.kl_horizon}")
        if not 0 <= p.ema_decay < 1:
            raise ConfigError("ppo.ema_decay must be in [0, 1)")
        if not (0 <= p.collapse_distinct_below <= 1 and 0 <= p.collapse_distinct2_below <= 1):
            raise ConfigError("ppo.collapse_distinct_below and ppo.collapse_distinct2_below must be in [0, 1]")
        if p.collapse_patience < 0 or p.eval_every < 0:
            raise ConfigError("ppo.collapse_patience and ppo.eval_every must be >= 0")
        if self.hybrid.tp_size < 1:
            raise ConfigError("hybrid.tp_size must be >= 1")
        if self.hybrid.tp_size > 1 and self.hybrid.backend != "portable":
            raise ConfigError("hybrid.tp_size > 1 is the portable engine's tensor-parallel mode (DeepSpeed AutoTP); "
                              "use hybrid.backend=portable")
        for role in ("actor", "critic"):
            validate_engine(f"{role}.engine", getattr(self, role).engine)
        for role in ("reference", "reward"):
            validate_frozen_engine(f"{role}.engine", getattr(self, role).engine)


register_step_config("ppo", PPOConfig)


@dataclass
class DPOAlgoConfig:
    """Offline preference optimisation (`rlhf-ds dpo`); the losses are in rlhf_ds/rl/preference.py."""

    # sigmoid (DPO), ipo, simpo (no reference model), or a loss a plugin registers (rlhf_ds/rl/preference.py)
    loss: PreferenceLossName = "sigmoid"
    beta: float = 0.1  # sigmoid/ipo: strength of the implicit KL to the reference; simpo: reward scale (paper: 2-10)
    label_smoothing: float = 0.0  # conservative DPO: the probability that a preference label is flipped (< 0.5)
    simpo_gamma: float = 0.5  # SimPO target reward margin (gamma; gamma / beta is the margin in log-prob units)
    sft_coef: float = 0.0  # RPO-style: + sft_coef * per-token NLL of the chosen responses
    # average the log-probs over response tokens instead of summing them; None = per loss: simpo and ipo average,
    # sigmoid sums (SimPO is defined on averages)
    length_normalize: Optional[bool] = None
    # score every pair with the reference once before training, cache the log-probs on disk (keyed by a fingerprint
    # of the data and the reference) and free the reference: it is not in memory while the policy trains
    precompute_reference: bool = False
    reference_cache: Optional[str] = None  # None = <output_dir>/reference_logps.safetensors

    def averages(self) -> bool:
        from rlhf_ds.rl.preference import LOSSES

        return LOSSES.get(self.loss).averages if self.length_normalize is None else self.length_normalize


@dataclass
class DPOConfig(StepConfig):
    output_dir: str = "runs/dpo"  # run directory: config.yaml, metrics.jsonl, results.json, model/, checkpoints/
    model: str = "runs/sft"  # the policy's starting point (the SFT output)
    # the frozen reference: model None = the policy's starting weights; with engine.lora on (and no precomputation)
    # that is the policy itself with its adapters switched off, so no second copy is loaded
    reference: RoleConfig = field(default_factory=RoleConfig)
    trust_remote_code: bool = False  # allow model code from the model folders (transformers' trust_remote_code)
    dpo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lr=1e-4, warmup_ratio=0.1))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1, eval_every=100))
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)

    def validate(self) -> None:
        from rlhf_ds.rl.preference import LOSSES

        d, loss = self.dpo, LOSSES.get(self.dpo.loss)
        if d.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0, got {d.beta}")
        if not 0 <= d.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5), got {d.label_smoothing}")
        if d.label_smoothing and not loss.smooths:
            smoothing = [name for name, other in LOSSES.items() if other.smooths]
            raise ConfigError(f"dpo.label_smoothing applies to the {' and '.join(smoothing)} losses, not {d.loss}")
        if d.sft_coef < 0:
            raise ConfigError(f"dpo.sft_coef must be >= 0, got {d.sft_coef}")
        if d.loss == "simpo" and d.length_normalize is False:
            raise ConfigError("dpo.loss=simpo is defined on length-normalised log-probs: leave dpo.length_normalize "
                              "unset (or true)")
        if not loss.needs_reference and (self.reference.model or d.precompute_reference):
            raise ConfigError(f"dpo.loss={d.loss} uses no reference model: unset reference.model and "
                              "dpo.precompute_reference")
        validate_engine("reference.engine", self.reference.engine)


register_step_config("dpo", DPOConfig)


@dataclass
class EvalConfig(StepConfig):
    """Final evaluation (`rlhf-ds eval`): sampled responses of the SFT and PPO policies to held-out prompts, scored by
    the gold reward (built-in task) and the reward model. Runs in one process with plain transformers."""

    output_dir: str = "runs/eval"  # run directory: results.json, samples.jsonl, metrics.jsonl
    sft_model: Optional[str] = "runs/sft"  # None = evaluate the PPO policy alone
    ppo_model: Optional[str] = "runs/ppo"  # None = evaluate the SFT policy alone
    dpo_model: Optional[str] = None  # a DPO policy to evaluate side by side with the others (e.g. runs/dpo)
    reward_model: Optional[str] = "runs/rm"  # None = no RM scores
    # a verifiable reward "package.module:function" or "path/file.py:function" (as ppo's reward.function): each
    # response's function reward, the share that passes (reward >= pass_threshold) and pass@k per policy
    reward_function: Optional[str] = None
    # or a reward served by `rlhf-ds serve-reward` (as ppo's reward.url), scored the same way (pass, pass@k)
    reward_url: Optional[str] = None
    reward_token_file: Optional[str] = None  # the server's shared secret (as ppo's reward.token_file)
    pass_threshold: float = 1.0  # a response passes when its function reward is at least this
    # k of pass@k (unbiased estimate from samples_per_prompt samples; each k <= samples_per_prompt); empty = 1 and
    # samples_per_prompt
    pass_k: list[int] = field(default_factory=list)
    greedy_pass: bool = True  # with reward_function: also one greedy answer per prompt, its share passing
    prompts: Optional[str] = None  # prompts file; None = the built-in task's held-out eval_prompts.jsonl
    template: Optional[str] = None  # prompt template, as the data.template the policies were trained with
    max_prompts: int = 0  # 0 = all
    # as PPO's data.max_prompt_tokens; null = the model's positions less generation.max_new_tokens
    max_prompt_tokens: Optional[int] = None
    batch_size: int = 32  # prompts per generation batch
    # the policies as PPO trained them: sampled at T=1, several samples per prompt (greedy decoding of tiny models
    # degenerates into repetition, which says little about the policy)
    samples_per_prompt: int = 4
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    device: str = "auto"  # auto = cuda when available, else cpu
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # dtype of the evaluated models
    seed: int = 1234  # seeds the sampling (the same stream for every policy)
    trust_remote_code: bool = False  # run model code shipped inside a checkpoint folder (off: safe default)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)

    def validate(self) -> None:
        if self.sft_model is None and self.ppo_model is None and self.dpo_model is None:
            raise ConfigError("eval needs sft_model, ppo_model or dpo_model (or several)")
        if self.batch_size <= 0 or self.max_prompts < 0 or self.samples_per_prompt <= 0:
            raise ConfigError("eval.batch_size and eval.samples_per_prompt must be > 0 and eval.max_prompts >= 0")
        if self.generation.temperature <= 0 or self.generation.max_new_tokens <= 0:
            raise ConfigError("eval.generation.temperature and max_new_tokens must be > 0")
        validate_generation("generation", self.generation)
        if self.reward_function:
            from rlhf_ds.rewards.function import load_function

            load_function(self.reward_function)  # a typo fails before any model is loaded
        if self.reward_function and self.reward_url:
            raise ConfigError("eval scores responses with reward_function or reward_url, not both")
        if self.reward_token_file and not self.reward_url:
            raise ConfigError("eval.reward_token_file is the token for reward_url, which is not set")
        if self.pass_k and not (self.reward_function or self.reward_url):
            raise ConfigError("eval.pass_k counts responses that pass eval.reward_function, which is not set")
        bad = [k for k in self.pass_k if not 1 <= k <= self.samples_per_prompt]
        if bad:
            raise ConfigError(f"eval.pass_k {bad}: each k must be in 1..eval.samples_per_prompt "
                              f"({self.samples_per_prompt})")


register_step_config("eval", EvalConfig)

PIPELINE_STEPS = ("pretrain", "sft", "rm", "ppo", "dpo", "eval")  # every step a pipeline can run, in order
# the steps of each `algorithm`: the RLHF branch (reward model + PPO), the offline branch (DPO), or both from one SFT model
ALGORITHM_STEPS = {"ppo": ("pretrain", "sft", "rm", "ppo", "eval"), "dpo": ("pretrain", "sft", "dpo", "eval"),
                   "both": PIPELINE_STEPS}


@dataclass
class PipelineConfig(StepConfig):
    """`rlhf-ds pipeline`: steps 0-3 and the final evaluation in one run directory (`<output_dir>/<step>`).

    The step sections are the steps' own configs with their own defaults; the pipeline sets their `output_dir`, the
    model paths that link one step to the next, `task` and `tracking` (shared by all steps, one wandb group), and
    adds its `plugins` to each step's."""

    output_dir: str = "runs/pipeline"  # run directory: one folder per step, summary.json, metrics.jsonl, report.html
    algorithm: Literal["ppo", "dpo", "both"] = "ppo"  # which branch(es) run after SFT (ALGORITHM_STEPS)
    num_gpus: int = 2  # local ranks per step (deepspeed launcher); each step is a fresh process group
    pretrain_num_gpus: int = 2  # data-parallel ZeRO-0 by default
    master_port: Optional[int] = None  # None = a free port per step
    base_model: Optional[str] = None  # an existing causal LM: skips pretrain
    sft_model: Optional[str] = None  # an existing SFT policy: skips sft
    reward_model: Optional[str] = None  # an existing reward model: skips rm
    skip: Union[list[str], str] = field(default_factory=list)  # steps not to run: [pretrain] or "pretrain,sft"
    only: Union[list[str], str, None] = None  # run just these steps (`only=rm`, `only=[rm,ppo]`); inputs must exist
    resume_completed_steps: bool = False  # skip steps whose results.json exists in the run directory
    report: bool = True  # write summary.json, metrics.jsonl, plots/ and report.html at the end
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    task: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        self.skip = step_list(self.skip) or []
        self.only = step_list(self.only)
        for key in ("skip", "only"):
            for name in getattr(self, key) or []:
                if name not in PIPELINE_STEPS:
                    raise ConfigError(f"{key}: unknown step '{name}' (steps: {', '.join(PIPELINE_STEPS)})")
        if self.only is not None and not self.only:
            raise ConfigError("only: name at least one step")
        outside = [s for s in self.only or [] if s not in ALGORITHM_STEPS[self.algorithm]]
        if outside:
            raise ConfigError(f"only: step '{outside[0]}' is not part of algorithm={self.algorithm} "
                              f"(its steps: {', '.join(ALGORITHM_STEPS[self.algorithm])})")
        if self.num_gpus <= 0 or self.pretrain_num_gpus <= 0:
            raise ConfigError("num_gpus and pretrain_num_gpus must be > 0")
        for name in PIPELINE_STEPS:
            validate(getattr(self, name))


def step_list(value) -> Optional[list[str]]:
    """`"rm"`, `"sft,rm"` or `["sft", "rm"]` -> a list of step names; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


register_step_config("pipeline", PipelineConfig)
