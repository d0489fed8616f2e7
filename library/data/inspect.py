"""Show what a dataset config resolves to (buckets, counts, steps per epoch) without loading any model.

Usage: python -m library.data.inspect --dataset_config my_data.toml [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from library.config.dataset_config import load_dataset_config
from library.data.dataset import DatasetGroup
from library.data.summary import format_summary
from library.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_config", type=Path, required=True, help="dataset config file (.toml or .json)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        # The weight of reg images does not change any count, so any value serves here.
        group = DatasetGroup.from_config(load_dataset_config(args.dataset_config), seed=0, prior_loss_weight=1.0)
    except UserError as err:
        logging.getLogger(__name__).error("%s", err)
        return 2
    summary = group.summary()
    print(json.dumps(summary, ensure_ascii=False) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
