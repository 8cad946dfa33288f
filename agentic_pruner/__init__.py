"""agentic-pruner: MAC-budgeted structured pruning with an agent in the loop."""
__version__ = "0.1.0"
