"""Rollout: generation engines (vLLM | transformers) on Ray actors, thinking budget, weight sync.

Heavy modules (vllm, torch, ray) load lazily; import what you use::

    from posttrain.rollout.pool import LogprobCheck, RolloutPool
    from posttrain.rollout.weight_sync import full_state_dict

    with RolloutPool(cfg.model, cfg.rollout) as pool:          # actors rollout-0 .. rollout-{N-1}
        groups = pool.generate(prompts, cfg.generation)        # [prompt][sample] -> Rollout
        report = pool.sync_weights(full_state_dict(policy),    # no restart; prefix cache reset
                                   check=LogprobCheck.from_model(policy, ids, start))
        report.max_abs_logprob_diff                            # engines vs trainer

Modules: ``engine`` (actor body, one interface), ``backend_vllm`` / ``backend_hf`` (the two
backends), ``budget`` + ``vllm_budget`` (thinking budget), ``weight_sync`` (staging updates),
``pool`` (N actors, sharding, deadlines, ``play`` for multi-turn episodes), ``episodes`` (token-exact
multi-turn episodes interleaved on one event loop, ``Dispatcher``), ``types`` (records and errors).
"""
