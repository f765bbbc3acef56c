"""`python -m clear_fast.train`: CleaR and its baselines from the command line.

Errors a user can fix (bad flags, missing files or columns, unknown models or datasets) are printed
as one clear message with exit status 2, not as a traceback.
"""
import os
import sys
import warnings

# Offline unless the user says otherwise: a hub name then fails at once instead of retrying for ~46 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None):
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_for_ours(warnings.showwarning)
        return _main(argv)


def _one_line_for_ours(show):
    """clear_fast's own warnings (settings, data, the mixture's convergence) as one 'warning:' line
    each, the moment they are raised; other libraries' warnings as those libraries print them."""
    package = os.path.dirname(os.path.abspath(__file__))

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and os.path.abspath(filename).startswith(package):
            print(f"warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return showwarning


def _main(argv):
    from .config import parse_config

    run = None
    try:
        config = parse_config(argv)
        from .trainer import Run

        run = Run(config)
        results = run.run()
    except (ValueError, FileNotFoundError) as e:  # UserError and the libraries' own messages
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        advice = run.interrupted_advice() if run is not None else "nothing was written"
        print(f"\ninterrupted: {advice}", file=sys.stderr)
        return 130
    print(f"\nbest test accuracy {results['best_test_accuracy']:.4f} (epoch {results['best_epoch']}), "
          f"last {results['last_test_accuracy']:.4f}"
          + (f", dev-selected {results['dev_selected_test_accuracy']:.4f}" if "dev_selected_test_accuracy" in results else ""))
    print(f"outputs in {os.path.abspath(config.output_dir)}: {', '.join(run.outputs_present())}")
    if "per_sample.csv" in run.outputs_present():
        print("per_sample.csv lists the training samples likeliest to be mislabelled first")
    return 0


if __name__ == "__main__":
    sys.exit(main())
