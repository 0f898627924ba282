"""Tiny models for the hybrid-engine and PPO tests, built in-process in seconds (no CLI runs).

    build_tiny_models(root) -> {"gpt2": dir, "llama": dir, "gpt2_rm": dir, "llama_rm": dir}

`gpt2` (2 layers, d=64, own byte-level BPE of 640 tokens) and `llama` (2 layers, d=64, own one of 512 tokens: a
different vocabulary) are briefly fine-tuned on the built-in task's demonstrations so they answer in the task's
language and emit EOS at varying lengths; `*_rm` are reward-model folders (backbone + seeded scalar head + a non-zero
normalisation offset) in the layout `rlhf_ds rm` writes. Everything is seeded; a finished build is reused.
"""
from __future__ import annotations

import os

ARCHS = {"gpt2": 640, "llama": 512}  # architecture -> byte-level BPE vocabulary (256 bytes + specials + merges)
RM_OFFSET = 0.25


def _finetune(model, tokenizer, rows, steps: int, seed: int) -> None:
    import torch

    from rlhf_ds.data.features import collate_sft, sft_features
    from rlhf_ds.data.formats import SFTExample

    feats, _ = sft_features([SFTExample(prompt=r["prompt"], response=r["response"]) for r in rows], tokenizer,
                            max_prompt_tokens=24, max_seq_len=48, loss_on_prompt=True)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(feats), (16,), generator=g).tolist()
        batch = collate_sft([feats[i] for i in idx], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                                 ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_tiny_models(root: str, steps: int = 150) -> dict[str, str]:
    import torch

    dirs = {name: os.path.join(root, name) for a in ARCHS for name in (a, f"{a}_rm")}
    if os.path.isfile(os.path.join(root, "done")):
        return dirs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # other test processes share the cores: more threads is many times slower here
    try:
        _build(dirs, steps)
    finally:
        torch.set_num_threads(threads)
    open(os.path.join(root, "done"), "w").close()
    return dirs


def _build(dirs: dict[str, str], steps: int) -> None:
    import torch
    from transformers import AutoModel

    from rlhf_ds.config import ArchConfig
    from rlhf_ds.data.builtin_task import BuiltinTask
    from rlhf_ds.models.scalar_head import ScalarHeadModel, save_scalar_head_model
    from rlhf_ds.steps.pretrain import build_model, train_tokenizer

    task = BuiltinTask(0)
    corpus = task.pretrain_corpus(600)
    rows = task.sft_rows(600)
    for i, (arch, vocab) in enumerate(ARCHS.items()):
        torch.manual_seed(1000 + i)
        tok = train_tokenizer(corpus, vocab)
        model = build_model(ArchConfig(type=arch, n_layers=2, hidden=64, n_heads=2, max_positions=96, vocab_size=vocab), tok)
        _finetune(model, tok, rows, steps, seed=i)
        model.save_pretrained(dirs[arch], safe_serialization=True)
        tok.save_pretrained(dirs[arch])
        backbone = AutoModel.from_pretrained(dirs[arch], dtype=torch.float32)
        head = torch.nn.Linear(backbone.config.hidden_size, 1)
        with torch.no_grad():
            head.weight.copy_(torch.randn(1, backbone.config.hidden_size, generator=torch.Generator().manual_seed(i)))
            head.bias.zero_()
        save_scalar_head_model(ScalarHeadModel(backbone, head, offset=RM_OFFSET), tok, dirs[f"{arch}_rm"])


def tiny_models(tmp_path_factory) -> dict[str, str]:
    """The session's build (shared by every test module that asks; built once per pytest base temp)."""
    return build_tiny_models(str(tmp_path_factory.getbasetemp() / "rlhf_tiny_models"))


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(build_tiny_models(sys.argv[1])))
