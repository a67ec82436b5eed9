"""Option help texts shared by several commands."""

ALGO_HELP = "Training algorithm: edp (asynchronous, elastic) or syncps (synchronous, straggler deadline)."
