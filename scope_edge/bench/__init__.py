"""The benchmark library and `scope-edge bench`, one module a concept:

- config: BenchConfig (engine, policy by name and budgets, run) and the
  scoring and budget names the scripts' flags take;
- prompts: the logbook prompt in the GGUF's chat template, its EOG tokens;
- lockstep: the fidelity lockstep and free-running scores, and the untimed
  stock run that keeps the full cache's logits for it (stock_reference);
- run: one configuration against stock, ours and the ideal (run_bench, run_many);
- results: machine facts, peak RSS, results written as JSON;
- command: `scope-edge bench` (its flags, table, main).

Every speed figure is timed by scope_edge.protocol, the one speed protocol
(its single stock loop, StockSteps / stock_greedy).
"""
from __future__ import annotations

from .command import add_arguments, add_parser, config_from_args, format_table, main
from .config import KEY_ONLY, BenchConfig, budget_pairs, scoring_engine, scoring_name
from .lockstep import Fidelity, Reference, free_running, lockstep, log_softmax, stock_reference
from .prompts import SYSTEM_PROMPT, chat_prompt, eog_tokens, logbook_prompt, vocabulary
from .results import machine, peak_rss_bytes, save_results
from .run import open_ours, run_bench, run_many, run_ours

__all__ = ["KEY_ONLY", "SYSTEM_PROMPT", "BenchConfig", "Fidelity", "Reference", "add_arguments", "add_parser",
           "budget_pairs", "chat_prompt", "config_from_args", "eog_tokens", "format_table", "free_running",
           "lockstep", "log_softmax", "logbook_prompt", "machine", "main", "open_ours", "peak_rss_bytes",
           "run_bench", "run_many", "run_ours", "save_results", "scoring_engine", "scoring_name",
           "stock_reference", "vocabulary"]
