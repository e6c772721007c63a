"""Evaluation harness (EXACT §6): protocol configs, runner, metrics, judges, reports.

    prefsteer eval --config quick --json
    prefsteer eval report RUN_DIR

    >>> from prefsteer.evaluation import load_config, Runner
"""

from prefsteer.evaluation.metrics import improvement_share, mean_std, pairwise_accuracy, prompt_winrate, summarize
from prefsteer.evaluation.protocol import EvalConfig, MethodSpec, available_configs, load_config
from prefsteer.evaluation.runner import Runner, read_records

__all__ = ["EvalConfig", "MethodSpec", "Runner", "available_configs", "improvement_share", "load_config",
           "mean_std", "pairwise_accuracy", "prompt_winrate", "read_records", "summarize"]
