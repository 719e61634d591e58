"""Evaluation harness: tasks, scoring, the shared-prefill runner, CSV records with resume, summaries, plots.

    kvjax eval passkey --method full snapkv tova --ratio 0.25 0.5 0.75 --lengths 1024 2048 --n 10
    kvjax plot passkey.csv

Modules: `prompts` (passkey, NIAH, haystacks), `ruler` (RULER-style tasks), `scoring`, `runner`
(one prefill per batch, one branch per configuration), `perplexity`, `bench`, `records` (CSV,
metadata, resume), `summary` (markdown), `plots`, `command` (the CLI).
"""
from kvjax.eval.prompts import Sample, niah_sample, passkey_sample
from kvjax.eval.records import ResultsFile, read_rows
from kvjax.eval.ruler import ruler_sample
from kvjax.eval.runner import Config, make_configs, run_retrieval
from kvjax.eval.scoring import contains_all, string_match_all

__all__ = ["Sample", "passkey_sample", "niah_sample", "ruler_sample", "Config", "make_configs", "run_retrieval",
           "ResultsFile", "read_rows", "contains_all", "string_match_all"]
