"""`rlhf-ds` command line.

    rlhf-ds <step> [--config run.yaml] [key.sub=value ...] [--num-gpus N]      step = pretrain | sft | rm | ppo | dpo
    rlhf-ds pipeline [--config run.yaml] [key=value ...] [--num-gpus N] [--dry-run]
    rlhf-ds eval [--config eval.yaml] [key=value ...]
    rlhf-ds report <run_dir>
    rlhf-ds generate <model> <prompts> -o <out.jsonl> [sampling options]
    rlhf-ds score <reward_model> <pairs.jsonl> -o <scores.jsonl>
    rlhf-ds chat <model> [--template "human : {input} assistant :"]
    rlhf-ds rm-report <reward_model> [--pairs pairs.jsonl [--format F] [--columns M] [--template T]]
                      [--samples samples.jsonl] -o <dir>
    rlhf-ds serve-reward <reward_model> [--host 127.0.0.1] [--port 8000]        HTTP scores for reward.url
    rlhf-ds config show <step>                                                  a complete default YAML config
    rlhf-ds plan ...                                                            memory planner (rlhf_ds.planner)

Under the deepspeed launcher (`deepspeed --num_gpus 2 --module rlhf_ds.cli sft ...`) a step runs in every rank;
from a plain shell `--num-gpus N` starts that launcher for you. `pipeline` starts it once per step.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from rlhf_ds.config import STEP_CONFIGS, ConfigError, GenerationConfig, load_config
from rlhf_ds.engine.launcher import (PREEMPTED_EXIT_CODE, await_local_rank0, blame_dead_peer, peers_may_leave,
                                     record_exit, set_process_threads, start_rank, threads_per_process,
                                     under_launcher)

# step name -> module with `run(cfg)`; configs come from rlhf_ds.config
TRAINING_STEPS = {
    "pretrain": "rlhf_ds.steps.pretrain",
    "sft": "rlhf_ds.steps.sft",
    "rm": "rlhf_ds.steps.reward",
    "ppo": "rlhf_ds.steps.ppo",
    "dpo": "rlhf_ds.steps.dpo",
}
PLAN_HELP = "memory planner: will a job fit, and which settings make it fit"


class _Parser(argparse.ArgumentParser):
    """A parser whose help may end with a step's config keys (`keys_step`), read only when the help is printed: the
    names registered for component keys come from modules that import torch."""

    def __init__(self, *args, keys_step: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.keys_step = keys_step

    def format_help(self) -> str:
        if self.keys_step:
            from rlhf_ds.config_help import keys_help

            self.epilog = keys_help(self.keys_step)
        return super().format_help()


def _step_parser(sub, name: str, help_text: str, launcher: bool = True):
    p = sub.add_parser(name, help=help_text, description=help_text, keys_step=name,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config")
    if launcher:
        p.add_argument("--num-gpus", type=int, default=0, help="start N local ranks with the deepspeed launcher")
        p.add_argument("--master-port", type=int, default=None)
        p.add_argument("--resume", default=None, metavar="auto|never|PATH",
                       help="continue from the newest complete checkpoint (auto, the default), start afresh (never), "
                            "or continue from the checkpoint folder PATH (same as checkpoint.resume=...)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    return p


def _generation_args(p, max_new_tokens: int, sample_default: bool) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    if sample_default:
        g.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy decoding instead of sampling")
    else:
        g.add_argument("--do-sample", dest="do_sample", action="store_true", help="sample instead of greedy decoding")
    g.set_defaults(do_sample=sample_default)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longer prompts are left-truncated (or skipped: --prompt-overflow skip); default: the "
                        "model's positions less --max-new-tokens")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])


def _generation_config(args) -> GenerationConfig:
    if args.temperature <= 0 or args.max_new_tokens <= 0:
        raise ConfigError("--temperature and --max-new-tokens must be > 0")
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; `plan`'s own arguments are added (importing the planner) only when `command` is "plan"."""
    parser = argparse.ArgumentParser(prog="rlhf-ds", description="RLHF (pretrain, SFT, reward model, PPO) on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _step_parser(sub, "pretrain", "step 0: train a tokenizer and a small causal LM from scratch")
    _step_parser(sub, "sft", "step 1: supervised fine-tuning")
    _step_parser(sub, "rm", "step 2: reward model from pairwise rankings")
    _step_parser(sub, "ppo", "step 3: PPO against the reward model with a KL penalty (four ZeRO engines, hybrid engine)")
    _step_parser(sub, "dpo", "offline preference optimisation from pairs (DPO, IPO, SimPO): policy + frozen reference")

    p = _step_parser(sub, "pipeline", "steps 0-3 and the final evaluation in one run directory, one launcher per step",
                     launcher=False)
    p.add_argument("--num-gpus", type=int, default=None, help="local ranks per step (default: the config's num_gpus, 2)")
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="print which steps would run with which inputs, run nothing")

    _step_parser(sub, "eval", "final evaluation: SFT vs PPO policy on held-out prompts (gold reward, RM score, win rate)",
                 launcher=False)

    p = sub.add_parser("config", help="config tools: `config show <step>` prints a complete default YAML config")
    p.add_argument("action", choices=["show"])
    p.add_argument("step", choices=sorted(STEP_CONFIGS))

    p = sub.add_parser("report", help="(re)write summary.json, metrics.jsonl, plots/ and report.html of a pipeline run")
    p.add_argument("run_dir")

    p = sub.add_parser("generate", help="responses of a model to a prompts file, as JSONL")
    p.add_argument("model", help="model folder (or a step run folder holding model/)")
    p.add_argument("prompts", help="prompts: JSONL/JSON/CSV/Parquet/folder with prompt, question or messages")
    p.add_argument("-o", "--output", required=True, help="responses JSONL (written atomically)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=1, help="responses per prompt (use with sampling)")
    p.add_argument("--limit", type=int, default=0, help="first N prompts only (0 = all)")
    p.add_argument("--format", default="auto", help="prompt format: auto, prompt, question, messages")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--prompt-overflow", choices=["truncate", "skip"], default="truncate",
                   help="what to do with a prompt over --max-prompt-tokens (either way counted and named by row)")
    _generation_args(p, 64, sample_default=False)

    p = sub.add_parser("score", help="reward-model scores of prompt/response pairs, as JSONL")
    p.add_argument("model", help="reward model folder (an rm or ppo critic output)")
    p.add_argument("input", help="rows with prompt+response, prompt+completion or messages (e.g. generate's output)")
    p.add_argument("-o", "--output", required=True, help="scores JSONL (written atomically)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--raw", action="store_true", help="raw scores, without the stored normalisation")
    p.add_argument("--format", default="auto", help="input format: auto, prompt_response, prompt_completion, messages")
    p.add_argument("--max-prompt-tokens", type=int, default=256)
    p.add_argument("--max-response-tokens", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])

    p = sub.add_parser("rm-report", help="what a reward model rewards: accuracy by margin and by length difference on "
                       "held-out pairs, the highest-scoring responses among a policy's samples")
    p.add_argument("model", help="reward model folder (an rm output)")
    p.add_argument("--pairs", help="held-out preference pairs: a file or folder in any preference format, read as "
                   "`rlhf-ds rm` reads data.eval (e.g. the file you gave it as data.eval)")
    p.add_argument("--format", default="auto", help="the pairs' format, as data.format: auto, prompt_chosen_rejected, "
                   "stack_exchange, dialogue, ranked")
    p.add_argument("--columns", default=None, metavar="MAPPING",
                   help="rename the pairs' columns, as data.columns: canonical: yours, e.g. "
                        "'{question: title, response_j: good, response_k: bad}' (YAML or JSON)")
    p.add_argument("--template", default=None,
                   help="render the pairs' plain prompts with this template, as data.template (e.g. "
                        "'Question: {question}\\n\\nAnswer: {response}', where \\n is a newline); default: the "
                        "template the reward model was trained with (its scalar_head.json), when it names one; "
                        "'none': the prompts as they are")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                   help="a bad row of the pairs stops the command naming it (error), or is skipped and counted")
    p.add_argument("--samples", help="a policy's responses: eval/samples.jsonl, or generate's output")
    p.add_argument("-o", "--output", required=True, help="folder for rm_report.json and rm_report.html (a pipeline run "
                   "folder: `rlhf-ds report` then shows it)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])

    p = sub.add_parser("serve-reward", help="serve a reward model over HTTP (POST /score, GET /health) for PPO's "
                       "reward.url; listens on 127.0.0.1 unless --host says otherwise; every request is bounded in "
                       "texts, characters per text, time and connections (docs/rl.md)")
    p.add_argument("model", help="reward model folder (an rm output)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (0.0.0.0: every interface; use --token-file then)")
    p.add_argument("--token-file", default=None,
                   help="file holding a shared secret: /score answers only requests with 'Authorization: Bearer "
                        "TOKEN' (the client's reward.token_file), others get HTTP 401. Sent in clear (no TLS): use it "
                        "on a trusted network or behind a TLS proxy")
    p.add_argument("--workers", type=int, default=4, help="threads answering requests (one model, scored in turn)")
    p.add_argument("--max-connections", type=int, default=1024,
                   help="open connections at most: past it the oldest idle one is closed, or the new one gets 503")
    p.add_argument("--max-texts", type=int, default=1024, help="prompts (and responses) per request at most (else 413)")
    p.add_argument("--read-timeout", type=float, default=10.0,
                   help="seconds an idle connection, or a read of a request, may go without a byte before it is closed")
    p.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds from a request's first byte to its answer (reading, waiting, scoring); past it 503")
    p.add_argument("--port", type=int, default=8000, help="0 = a free port (the printed line names it)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="the policy's prompt budget (PPO's data.max_prompt_tokens), in the policy's tokens")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="the policy's response budget (PPO's generation.max_new_tokens); the reward model reads 4 of "
                        "its own tokens per policy token, within its positions (as PPO's reward model does)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass")

    p = sub.add_parser("chat", help="talk to a model on stdin: one message per line, /quit or EOF ends")
    p.add_argument("model")
    p.add_argument("--template", default=None,
                   help="prompt template with {input}, e.g. 'human : {input} assistant :' for the built-in task "
                        "(default: the tokenizer's chat template, else the line as typed)")
    p.add_argument("--reward-model", default=None, help="also print the reward model's score of each reply")
    p.add_argument("--gold-seed", type=int, default=None, help="also print the built-in task's gold reward (its seed)")
    _generation_args(p, 48, sample_default=False)

    if command == "plan":
        from rlhf_ds.planner import add_plan_arguments  # lazy: only `plan` pays for (and depends on) the planner

        add_plan_arguments(sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP))
    else:
        sub.add_parser("plan", help=PLAN_HELP, add_help=False)
    return parser


def _run_step(args, argv: list[str]) -> int:
    from rlhf_ds.engine import startup
    from rlhf_ds.engine.launcher import relaunch

    in_rank = under_launcher() or not args.num_gpus  # else: the wrapper that starts the launcher
    if in_rank:  # before the config's imports (torch, a reward function's module)
        start_rank()
        startup.begin("imports and config")
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    try:
        cfg = load_config(args.command, args.config, overrides)
    except ConfigError as e:
        print(f"rlhf-ds {args.command}: config error: {e}", file=sys.stderr)
        return 2
    if not in_rank:
        if _bad_threads(args.command, check_only=True):
            return 2
        rest = _without_launch_options(argv)
        return relaunch(args.command, cfg.output_dir, rest, args.num_gpus, args.master_port)
    if not under_launcher() and _bad_threads(args.command, export=True):  # one process: its threads from the cores
        return 2
    return run_training_step(args.command, cfg)


def _bad_threads(command: str, export: bool = False, check_only: bool = False) -> bool:
    """Set a single-process command's torch threads (`set_process_threads`; `check_only`: just check
    $RLHF_DS_THREADS, for the launcher to pass on); True when $RLHF_DS_THREADS is unusable (said on stderr)."""
    try:
        threads_per_process() if check_only else set_process_threads(export)
    except ValueError as e:
        print(f"rlhf-ds {command}: {e}", file=sys.stderr)
        return True
    return False


def run_training_step(step: str, cfg) -> int:
    """Run a step in this rank; the exit status says how it ended: 0 done, 2 bad input (nothing written but logs) or
    a run directory another live job writes, 75 stopped by SIGTERM/SIGUSR1 after saving a checkpoint (requeue me),
    1 failed."""
    from rlhf_ds.checkpoint import CheckpointError, Preempted, ResumeError
    from rlhf_ds.data.readers import DataError
    from rlhf_ds.envs.base import EnvironmentFailure
    from rlhf_ds.models.loading import ModelLoadError
    from rlhf_ds.rewards.base import RewardError
    from rlhf_ds.run_lock import RunDirInUse
    from rlhf_ds.steps.common import NonFiniteLossError
    from rlhf_ds.utils import is_rank0

    try:
        importlib.import_module(TRAINING_STEPS[step]).run(cfg)
    except (DataError, ModelLoadError, ResumeError, ConfigError, RunDirInUse) as e:
        if is_rank0():  # every rank reads the same input and fails the same way: say it once
            print(f"rlhf-ds {step}: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        if is_rank0():
            print(f"rlhf-ds {step}: {e}; exiting with status {PREEMPTED_EXIT_CODE} (run the same command to resume)",
                  file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    # each rank may meet its own: every rank says it
    except (NonFiniteLossError, CheckpointError, RewardError, EnvironmentFailure) as e:
        print(f"rlhf-ds {step}: {e}", file=sys.stderr)
        return 1
    return 0


def _without_launch_options(argv: list[str]) -> list[str]:
    """argv minus `--num-gpus N` / `--num-gpus=N` / `--master-port ...` (the relaunched ranks must not relaunch)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--num-gpus", "--master-port"):
            skip = True
            continue
        if a.startswith(("--num-gpus=", "--master-port=")):
            continue
        out.append(a)
    return out


def _run_pipeline(args) -> int:
    overrides = list(args.overrides)
    if args.num_gpus is not None:
        overrides.append(f"num_gpus={args.num_gpus}")
    if args.master_port is not None:
        overrides.append(f"master_port={args.master_port}")
    from rlhf_ds.run_lock import RunDirInUse
    from rlhf_ds.steps import pipeline

    try:
        cfg = load_config("pipeline", args.config, overrides)
        result = pipeline.run(cfg, dry_run=args.dry_run)
    except ConfigError as e:
        print(f"rlhf-ds pipeline: config error: {e}", file=sys.stderr)
        return 2
    except RunDirInUse as e:
        print(f"rlhf-ds pipeline: {e}", file=sys.stderr)
        return 2
    except pipeline.PipelinePreempted as e:
        print(f"rlhf-ds pipeline: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except pipeline.PipelineError as e:
        print(f"rlhf-ds pipeline: {e}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(json.dumps(result, indent=2))
    return 0


def _run_eval(args) -> int:
    try:
        cfg = load_config("eval", args.config, args.overrides)
    except ConfigError as e:
        print(f"rlhf-ds eval: config error: {e}", file=sys.stderr)
        return 2
    if not under_launcher() and _bad_threads("eval"):
        return 2
    from rlhf_ds.data.readers import DataError
    from rlhf_ds.models.loading import ModelLoadError
    from rlhf_ds.rewards.base import RewardError
    from rlhf_ds.steps import evaluate

    try:
        results = evaluate.run(cfg)
    except (ConfigError, DataError, ModelLoadError) as e:
        print(f"rlhf-ds eval: {e}", file=sys.stderr)
        return 2
    except RewardError as e:  # a reward function's bad output, a reward server that is gone or answers nonsense
        print(f"rlhf-ds eval: {e}", file=sys.stderr)
        return 1
    if results:
        print(json.dumps({k: v for k, v in results.items() if k not in ("models", "prompts")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if under_launcher():  # a rank: its stop signals and launcher watch before anything slow (the parser: 0.3 s)
        start_rank()
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    # overrides after an option (`--num-gpus 2 sft.train.epochs=3`) are left over by argparse: they are overrides too
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in TRAINING_STEPS:
        return _run_step(args, argv)
    if args.command == "pipeline":
        return _run_pipeline(args)
    if args.command == "eval":
        return _run_eval(args)
    if args.command == "config":
        from rlhf_ds.config_help import default_yaml

        sys.stdout.write(default_yaml(args.step))
        return 0
    if args.command == "report":
        from rlhf_ds.tracking.report import write_report

        try:
            write_report(args.run_dir)
        except FileNotFoundError as e:
            print(f"rlhf-ds report: {e}", file=sys.stderr)
            return 2
        print(f"{args.run_dir.rstrip('/')}/report.html")
        return 0
    if args.command == "plan":
        from rlhf_ds.planner import run_plan_cli

        return 2 if _bad_threads("plan") else run_plan_cli(args)
    return _run_tool(args)


def _mapping(text, flag: str):
    """A {canonical: yours} column mapping given on the command line as YAML or JSON (None when not given)."""
    if text is None:
        return None
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{flag}: not a YAML/JSON mapping: {e}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(f"{flag}: expected a mapping of column names, e.g. '{{question: title}}', got {text!r}")
    return value


def _unescape(template):
    """A template typed in a shell: `\\n` and `\\t` are a newline and a tab (as in a YAML double-quoted string)."""
    return None if template is None else template.replace("\\n", "\n").replace("\\t", "\t")


def _run_tool(args) -> int:
    if _bad_threads(args.command):  # generate, score, rm-report, serve-reward, chat: one process each
        return 2
    from rlhf_ds.steps import evaluate

    try:
        if args.command == "generate":
            rows = evaluate.generate_file(
                args.model, args.prompts, args.output, _generation_config(args), args.batch_size, args.max_prompt_tokens,
                args.num_samples, args.limit, args.seed, args.device, args.precision, args.format, args.trust_remote_code,
                args.prompt_overflow)
            print(f"{len(rows)} responses -> {args.output}", file=sys.stderr)
        elif args.command == "score":
            rows = evaluate.score_file(args.model, args.input, args.output, args.batch_size, not args.raw,
                                       args.max_prompt_tokens, args.max_response_tokens, args.device, args.precision,
                                       args.format)
            mean = sum(r["score"] for r in rows) / len(rows)
            print(f"{len(rows)} scores -> {args.output} (mean {mean:+.4f})", file=sys.stderr)
        elif args.command == "rm-report":
            from rlhf_ds.tracking.rm_report import write_rm_report

            write_rm_report(args.model, args.output, args.pairs, args.samples, args.batch_size, args.device,
                            args.precision, args.format, _mapping(args.columns, "--columns"),
                            _unescape(args.template), args.on_bad_row)
            print(f"{args.output.rstrip('/')}/rm_report.html", file=sys.stderr)
        elif args.command == "serve-reward":
            from rlhf_ds.rewards.server import serve

            return serve(args.model, args.host, args.port, args.device, args.precision, args.max_prompt_tokens,
                         args.max_new_tokens, args.batch_size, args.token_file, args.workers, args.max_connections,
                         args.max_texts, args.read_timeout, args.request_timeout)
        elif args.command == "chat":
            evaluate.chat_loop(args.model, _generation_config(args), args.template, args.reward_model, args.gold_seed,
                               args.max_prompt_tokens, args.device, args.precision, args.seed)
        else:
            return 2
    except (ConfigError, ValueError, FileNotFoundError) as e:  # DataError and ModelLoadError are ValueErrors
        print(f"rlhf-ds {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def entry() -> int:
    """The `rlhf-ds` command and `python -m rlhf_ds.cli`. A rank in a process group leaves through
    `strategy.end_rank` whatever its status (meeting its peers only after a step run to its end or to a saved
    preemption); anything else exits the usual way."""
    try:
        code = main()
    except Exception as e:  # e.g. a collective whose peer died
        blame_dead_peer(f"{type(e).__name__}: {str(e)[:200]}")
        raise
    if code == 2:
        await_local_rank0()  # every rank refuses the same input; rank 0 says why before the launcher ends the job
    elif code not in (0, PREEMPTED_EXIT_CODE):
        blame_dead_peer(f"its step failed with status {code}")
    record_exit()  # for the supervisor above the launcher: this process got to return a status
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from rlhf_ds.engine.strategy import end_rank

            end_rank(code, together=code in (0, PREEMPTED_EXIT_CODE))
    peers_may_leave()
    return code


if __name__ == "__main__":
    sys.exit(entry())
