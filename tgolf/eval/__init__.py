"""Evaluation: exact val_loss / val_bpb over non-overlapping or sliding windows (bpb.py); stateful.py carries
linear-attention state across windows; ttt.py adapts the model to the tokens already scored (score-first TTT)."""
from tgolf.eval.bpb import EvalResult, Totals, evaluate, plan_windows, token_bytes

__all__ = ["EvalResult", "Totals", "evaluate", "plan_windows", "token_bytes"]
