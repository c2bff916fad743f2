"""The fit loop, checkpoints, distributed helpers and run folders."""
