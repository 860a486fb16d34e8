"""The old path of `llamaforge.evaluation.lm_eval_bridge`, kept so `python -m llamaforge.lm_eval_bridge` works.
Importing it registers the `llamaforge` model type with lm-eval."""
from .evaluation.lm_eval_bridge import LlamaforgeLM, main  # noqa: F401

if __name__ == "__main__":
    main()
