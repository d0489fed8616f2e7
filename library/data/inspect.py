"""Show what a dataset config resolves to (buckets, counts, steps per epoch, sample captions) without any model.

Usage: python -m library.data.inspect --dataset_config my_data.toml [--json]
       python -m library.data.inspect --train_data_dir train --reg_data_dir reg --resolution 512 [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from library.config.dataset_cli import DatasetSource, add_dataset_option_arguments, load_group_config
from library.data.dataset import DatasetGroup
from library.data.summary import format_summary
from library.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    add_dataset_option_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample captions (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        # The weight of reg images does not change any count, so any value serves here.
        config = load_group_config(DatasetSource.from_args(args))
        group = DatasetGroup.from_config(config, seed=args.seed, prior_loss_weight=1.0)
    except UserError as err:
        logging.getLogger(__name__).error("%s", err)
        return 2
    summary = group.summary(sample_captions=True)
    print(json.dumps(summary, ensure_ascii=False) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
