"""One budgeted multi-task SFT run on Ray: the command line.

    python -m raymix.train [CONFIG.yaml] [--set key=value ...] --output DIR

With no config, the embedded default runs: the built-in synthetic suite, a
small Llama model built from a config and a tokenizer trained on the pool.
Writes ``DIR/summary.json`` (the fields scripts compare runs by), the final
Hugging Face checkpoint in ``DIR/model``, and one MLflow run. The work is
done by the driver layer (``raymix.driver``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from raymix.config import load_config, to_yaml
from raymix.driver import run
from raymix.errors import RaymixError
from raymix.registry import policy_spec, resolve


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raymix.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="YAML run config (default: the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set policy.name=proportional (repeatable)")
    parser.add_argument("--output", required=True, help="run directory (summary.json, model, MLflow store)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run in --output from its last checkpoint (its saved "
                             "config unless CONFIG/--set are given; runtime.* may change, nothing else)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args(argv)
    try:
        config = args.config
        if args.resume and config is None:
            saved = Path(args.output) / "config.yaml"
            if not saved.exists():
                raise RaymixError(f"--resume: {Path(args.output).resolve()} holds no run to resume (no config.yaml)")
            config = str(saved)
        cfg = load_config(config, args.overrides)
        if args.print_config:
            print(to_yaml(cfg))
            return 0
        summary = run(cfg, args.output, resume=args.resume)
    except RaymixError as e:
        print(f"raymix: error: {e}", file=sys.stderr)
        return 2
    keys = ("policy", "seed", "budget_tokens", "train_tokens", "overshoot_tokens", "worst_val_loss",
            "worst_val_task", "mean_val_loss", "worst_test_loss", "mean_test_loss", "mean_test_exact_match", "tokens_per_second", "wall_seconds", "restores",
            "mixer_restarts")
    describe = policy_spec(cfg.policy.name).describe
    for line in resolve(describe)(summary) if describe is not None else []:
        print(line)
    print(json.dumps({k: summary[k] for k in keys}, indent=1))
    print(f"[raymix] wrote {Path(args.output) / 'summary.json'}; MLflow run {summary['mlflow_run_id']} "
          f"at {summary['mlflow_tracking_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
