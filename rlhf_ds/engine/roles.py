"""Step 3's four roles as DeepSpeed engines: the actor and the critic trained, the reference and the reward model
frozen, each with its own engine settings (`actor.engine`, `critic.engine`, ...)."""
from __future__ import annotations

import logging

from rlhf_ds.config import PPOConfig
from rlhf_ds.engine import strategy
from rlhf_ds.models.loading import apply_lora, load_causal_lm
from rlhf_ds.models.scalar_head import load_scalar_head_model
from rlhf_ds.rl.advantages import get_estimator

log = logging.getLogger("rlhf_ds")


def build_models(cfg: PPOConfig, tokenizer, reward_tokenizer):
    """The engines: actor (trained), reference (frozen; None when the actor is LoRA and `reference.model` is unset: the
    actor's base with its adapters off is the reference, no second copy), critic (trained; only for estimators that
    need one, else None) and the reward model (frozen; only when `reward.model` is given, else None)."""
    p = cfg.ppo
    samples = p.rollout_batch_size * p.n_samples_per_prompt
    updates = p.steps * p.ppo_epochs * (samples // (p.micro_batch_size * p.grad_accum))
    actor_ds = strategy.ds_config_for(cfg.actor.engine, p.micro_batch_size, p.grad_accum, role="actor")
    actor = load_causal_lm(cfg.actor.model, actor_ds, cfg.actor.engine.precision, disable_dropout=True,
                           trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
    if cfg.actor.engine.lora.enabled:
        actor = apply_lora(actor, cfg.actor.engine.lora)
    actor = strategy.init_trainable(actor, cfg.actor.engine, actor_ds, updates)

    reference = None
    if not lora_base_is_reference(cfg):
        ref_ds = strategy.ds_config_for(cfg.reference.engine, p.micro_batch_size, inference=True, role="reference")
        reference = load_causal_lm(cfg.reference.model or cfg.actor.model, ref_ds, cfg.reference.engine.precision,
                                   disable_dropout=True, trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
        reference = strategy.init_frozen(reference, ref_ds)

    critic = None
    if get_estimator(p.advantage_estimator).needs_critic:
        critic_ds = strategy.ds_config_for(cfg.critic.engine, p.micro_batch_size, p.grad_accum, role="critic")
        critic_src = cfg.critic.model or cfg.reward.model or cfg.actor.model
        if cfg.critic.model is None and cfg.reward.model and reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            # the critic reads the actor's token ids: a reward model with another vocabulary cannot initialise it
            log.warning("reward model %s has another tokenizer than the actor: critic initialised from the actor %s "
                        "(set critic.model to choose)", cfg.reward.model, cfg.actor.model)
            critic_src = cfg.actor.model
        critic = load_scalar_head_model(critic_src, critic_ds, cfg.critic.engine.precision,
                                        trust_remote_code=cfg.trust_remote_code, tokenizer=tokenizer)
        if cfg.critic.engine.lora.enabled:
            critic.backbone = apply_lora(critic.backbone, cfg.critic.engine.lora, task_type="FEATURE_EXTRACTION")
        critic = strategy.init_trainable(critic, cfg.critic.engine, critic_ds, updates)

    reward = None
    if cfg.reward.model:
        reward_ds = strategy.ds_config_for(cfg.reward.engine, p.micro_batch_size, inference=True, role="reward")
        reward = load_scalar_head_model(cfg.reward.model, reward_ds, cfg.reward.engine.precision,
                                        trust_remote_code=cfg.trust_remote_code, tokenizer=reward_tokenizer)
        reward = strategy.init_frozen(reward, reward_ds)
    return actor, critic, reference, reward


def lora_base_is_reference(cfg: PPOConfig) -> bool:
    """A LoRA actor with no `reference.model` is its own reference with the adapters off (its frozen base is the
    starting policy), as in DPO; set `reference.model` for a separate frozen copy."""
    return cfg.actor.engine.lora.enabled and cfg.reference.model is None
