"""``agentic-pruner llm``: agent-guided unstructured pruning of a causal LM (Prefect flow, resumable).

Registered by ``agentic_pruner.cli.build_parser``.
"""
from __future__ import annotations

import os
from pathlib import Path

from agentic_pruner._args import CliError, add_device_arg, llm_url


def _config(args):
    from pruning.llm.wanda import parse_nm
    from tasks.config import LLMRunConfig

    if args.model_path is not None and not Path(args.model_path).expanduser().is_dir():
        raise CliError(f"model directory not found: {args.model_path}")
    for flag, path in (("--mcq", args.mcq), ("--text", args.text)):
        if path is not None and not Path(path).is_file():
            raise CliError(f"{flag} file not found: {path}")
    if not 0 < args.target_sparsity < 0.95:
        raise CliError(f"--target-sparsity must lie in (0, 0.95), got {args.target_sparsity}")
    nm = parse_nm(args.nm)
    if nm is not None and args.target_sparsity > nm[0] / nm[1]:
        raise CliError(f"--target-sparsity {args.target_sparsity} exceeds what {args.nm} allows ({nm[0] / nm[1]:g})")
    if args.strategist == "llm" and not (args.llm_model or os.environ.get("AGENTIC_PRUNER_LLM_MODEL")):
        raise CliError("--strategist llm needs --llm-model (or AGENTIC_PRUNER_LLM_MODEL)")
    return LLMRunConfig(
        model_path=str(Path(args.model_path).expanduser()) if args.model_path else None,
        target_sparsity=args.target_sparsity, rollback_threshold=args.rollback_threshold,
        max_iterations=args.max_iterations, max_layer_sparsity=args.max_layer_sparsity, nm=args.nm,
        strategist=args.strategist, llm_base_url=llm_url(args.llm_base_url), llm_model=args.llm_model,
        llm_fallback=not args.no_llm_fallback, eval_tokens=args.eval_tokens, calib_sequences=args.calib_sequences,
        text_file=args.text, mcq_file=args.mcq, save_dir=args.save, store=args.store, run_id=args.run_id,
        seed=args.seed, **({"device": args.device} if args.device else {}))


def cmd_llm(args) -> int:
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "agents,pruning")
    from pruning.artifacts import open_store

    config = _config(args)
    open_store(config.store).check()  # unreachable storage / bad credentials fail before any work
    from flows.llm_prune import llm_prune

    s = llm_prune(config)
    if args.json:
        print(s.model_dump_json(indent=2))
    else:
        print()
        print(f"run {s.run_id}: {s.new_iterations} new + {s.resumed_iterations} resumed iterations, "
              f"{s.rollbacks} rollbacks, {s.fallbacks} LLM fallbacks; stop: {s.stop_reason}")
        print(f"sparsity {s.final_sparsity:.4f} (target {s.target_sparsity:.4f}); validation perplexity "
              f"{s.baseline_val_ppl:.4f} -> {s.final_val_ppl:.4f}; test perplexity {s.baseline_test_ppl:.4f} -> "
              f"{s.final_test_ppl:.4f}")
        if s.mcq_before is not None or s.mcq_after is not None:
            print(f"multiple-choice accuracy {s.mcq_before} -> {s.mcq_after}")
        print(f"device {s.device} ({s.device_name}), weights in {s.dtype}"
              + (f", peak GPU memory {s.peak_memory_gib:.3f} GiB" if s.peak_memory_gib is not None else ""))
        if s.saved_to:
            print(f"pruned model: {s.saved_to}")
        store = open_store(config.store)
        print(f"results:  {store.url_for(s.summary_key)}")
    return 0 if s.reached else 1


def register(sub) -> None:
    p = sub.add_parser("llm", help="agent-guided unstructured pruning of a causal LM (perplexity rollback, resumable)")
    p.add_argument("--model-path", help="local Hugging Face causal-LM directory (default: the embedded tiny Qwen3, "
                                        "trained once and cached)")
    p.add_argument("--target-sparsity", type=float, required=True, help="overall sparsity of the prunable linears, e.g. 0.45")
    p.add_argument("--store", default=os.environ.get("AGENTIC_PRUNER_STORE", "runs"),
                   help="local directory or s3://bucket/prefix")
    p.add_argument("--strategist", choices=["heuristic", "llm"], default="heuristic")
    p.add_argument("--nm", help="N:M semi-structured pattern, e.g. 2:4 (a pruned layer becomes exactly N:M)")
    p.add_argument("--rollback-threshold", type=float, default=0.10,
                   help="roll a step back when validation perplexity rises by more than this fraction (default 0.10)")
    p.add_argument("--max-iterations", type=int, default=80)
    p.add_argument("--max-layer-sparsity", type=float, default=0.9)
    p.add_argument("--llm-base-url", help="OpenAI-compatible endpoint (key from OPENAI_API_KEY)")
    p.add_argument("--llm-model", help="model name at that endpoint")
    p.add_argument("--no-llm-fallback", action="store_true",
                   help="fail instead of using the heuristic when the LLM is unreachable")
    p.add_argument("--text", help="own calibration/evaluation text (blank-line separated documents)")
    p.add_argument("--mcq", help="MMLU-style JSONL (question, choices, answer) evaluated before and after")
    p.add_argument("--eval-tokens", type=int, default=16384, help="validation/test tokens per perplexity")
    p.add_argument("--calib-sequences", type=int, default=32)
    p.add_argument("--save", help="write the pruned model (save_pretrained) to this directory")
    p.add_argument("--run-id", help="default: derived from the configuration, so re-running resumes")
    p.add_argument("--seed", type=int, default=0)
    add_device_arg(p, "the model is held (bf16 on CUDA) and statistics, masks and perplexities are computed")
    p.add_argument("--json", action="store_true", help="print the run summary as JSON")
    p.set_defaults(func=cmd_llm)
