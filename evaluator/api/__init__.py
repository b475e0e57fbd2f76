"""The Python API (HRET's names, doing what they say): `from evaluator import api as hret`.

evaluate.py: run a function over a benchmark and score it (evaluate, quick_eval, compare_models, ...);
tracking.py: metric history, evaluation contexts, results as data; training.py: checkpoints from a training
script (evaluate_checkpoint, the Hugging Face callback). docs/python_api.md shows each name with real output.
"""
from .evaluate import *  # noqa: F401,F403
from .evaluate import __all__ as _evaluate_all
from .tracking import *  # noqa: F401,F403
from .tracking import __all__ as _tracking_all
from .training import *  # noqa: F401,F403
from .training import __all__ as _training_all

__all__ = [*_evaluate_all, *_tracking_all, *_training_all]
