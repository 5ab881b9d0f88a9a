"""One-image inference through the task libraries' inferencers (what tools/demo.py runs)."""
from .inference import prediction_to_json, run_inference

__all__ = ['run_inference', 'prediction_to_json']
