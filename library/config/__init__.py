"""Configuration: the dataset config file (`dataset_config`) and its option table (`dataset_options`)."""
