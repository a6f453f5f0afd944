"""Training, export and the `gptoss-ft` command line."""
