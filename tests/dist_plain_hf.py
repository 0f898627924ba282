"""Checks of saved model folders with plain transformers/peft only (no rlhf_ds import): what a user downstream sees.

    python tests/dist_plain_hf.py '[["<command>", {json args}], ...]'

runs the checks in one process (imports are the slow part) and prints one JSON line: the list of their figures.
Commands:
  inspect   {"model": dir, "prompt": str}                      -> special token ids, greedy continuation, config
  sft_nll   {"models": [dir...], "data": jsonl, "max_seq_len": n} -> per model, token-weighted NLL of the responses
  lm_nll    {"model": dir, "data": jsonl, "block": n, "fraction": f} -> NLL of the held-out packed pretraining blocks
  lora      {"base": dir, "merged": dir, "adapter": dir, "prompt": str} -> adapter-on-base vs merged logits, weight diffs
"""
from __future__ import annotations

import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def inspect(model: str, prompt: str) -> dict:
    m, tok = load(model)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return {
        "pad": tok.pad_token_id, "eos": tok.eos_token_id, "bos": tok.bos_token_id, "len_tokenizer": len(tok),
        "vocab_size": m.config.vocab_size, "model_type": m.config.model_type,
        "new_ids": new, "text": tok.decode(new, skip_special_tokens=True),
        "config_pad": m.config.pad_token_id, "config_eos": m.config.eos_token_id,
    }


@torch.no_grad()
def sft_nll(models: list[str], data: str, max_seq_len: int) -> dict:
    """Mean NLL per response token (EOS included), sequences BOS + prompt + response + EOS cut at max_seq_len."""
    rows = read_jsonl(data)
    out = {}
    for path in models:
        m, tok = load(path)
        total, count = 0.0, 0
        for row in rows:
            prompt = [tok.bos_token_id] + tok(row["prompt"], add_special_tokens=False)["input_ids"]
            ids = (prompt + tok(row["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_seq_len]
            labels = [-100] * len(prompt) + ids[len(prompt):]
            logits = m(torch.tensor([ids])).logits[0, :-1]
            target = torch.tensor(labels[1:])
            total += torch.nn.functional.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
        out[path] = total / count
    return {"nll": out}


@torch.no_grad()
def lm_nll(model: str, data: str, block: int, fraction: float) -> dict:
    """Texts packed as BOS doc EOS ..., cut in blocks; the first `fraction` of blocks is the held-out set."""
    m, tok = load(model)
    stream: list[int] = []
    for row in read_jsonl(data):
        stream += [tok.bos_token_id, *tok(row["text"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
    blocks = [stream[i:i + block] for i in range(0, len(stream) - block + 1, block)]
    held = blocks[:max(1, int(len(blocks) * fraction))]
    losses = [m(torch.tensor(held[i:i + 32]), labels=torch.tensor(held[i:i + 32])).loss.item() * len(held[i:i + 32])
              for i in range(0, len(held), 32)]
    return {"nll": sum(losses) / len(held), "blocks": len(held), "model_type": m.config.model_type,
            "tied": m.get_output_embeddings().weight.data_ptr() == m.get_input_embeddings().weight.data_ptr()}


@torch.no_grad()
def lora(base: str, merged: str, adapter: str, prompt: str) -> dict:
    from peft import PeftModel

    base_m, tok = load(base)
    base_sd = {k: v.clone() for k, v in base_m.state_dict().items()}
    merged_m, _ = load(merged)
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]])
    base_logits = base_m(ids).logits
    with_adapter = PeftModel.from_pretrained(base_m, adapter).eval()  # wraps base_m in place
    a, b = merged_m(ids).logits, with_adapter(ids).logits
    merged_sd = merged_m.state_dict()
    changed = sorted(k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k]))
    lora_b = [p for n, p in with_adapter.named_parameters() if "lora_B" in n]
    return {
        "max_logit_diff": (a - b).abs().max().item(),
        "logit_scale": a.abs().max().item(),
        "base_vs_merged_logit_diff": (a - base_logits).abs().max().item(),
        "changed_weights": changed,
        "lora_b_nonzero": sum(int(p.abs().sum() > 0) for p in lora_b),
        "lora_b_count": len(lora_b),
        "adapter_config": json.load(open(f"{adapter}/adapter_config.json", encoding="utf-8")),
    }


COMMANDS = {"inspect": inspect, "sft_nll": sft_nll, "lm_nll": lm_nll, "lora": lora}


def main() -> None:
    figures = [COMMANDS[command](**args) for command, args in json.loads(sys.argv[1])]
    imported = any(name == "rlhf_ds" or name.startswith("rlhf_ds.") for name in sys.modules)
    print("RESULT " + json.dumps({"checks": figures, "rlhf_ds_imported": imported}))


if __name__ == "__main__":
    main()
