"""The old path of `llamaforge.evaluation.lm_eval_bridge`, kept so `python -m llamaforge.lm_eval_bridge` works.
Importing it registers the `llamaforge` model type with lm-eval."""
if __name__ == "__main__":
    import sys

    from .errors import LlamaforgeError
    try:
        from .evaluation.lm_eval_bridge import main
    except LlamaforgeError as e:  # lm-eval missing: the pip command, not a traceback
        print(f"llamaforge: error: {e}", file=sys.stderr)
        sys.exit(2)
    main()
else:
    from .evaluation.lm_eval_bridge import LlamaforgeLM, main  # noqa: F401
