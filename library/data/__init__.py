"""The dataset engine: image discovery, captions, aspect-ratio buckets and batches (see `dataset_group`)."""
