"""Evaluation of a MoA run: label accuracy per method and culture, routing accuracy and confusion."""
from moa.eval.report import format_markdown, write_report
from moa.eval.scoring import METHODS, cultural_prompt, evaluate, predict_labels, route_rows, sequence_logprobs

__all__ = ["METHODS", "evaluate", "predict_labels", "route_rows", "sequence_logprobs", "cultural_prompt",
           "format_markdown", "write_report"]
