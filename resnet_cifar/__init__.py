"""The library behind the train_*.py scripts and the tools: one concern per module (docs/layout.md)."""
