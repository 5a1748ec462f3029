"""Evaluation: exact val_loss / val_bpb over non-overlapping or sliding windows (see bpb.py)."""
from tgolf.eval.bpb import EvalResult, Totals, evaluate, plan_windows, token_bytes

__all__ = ["EvalResult", "Totals", "evaluate", "plan_windows", "token_bytes"]
