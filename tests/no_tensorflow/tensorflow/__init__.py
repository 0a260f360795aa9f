raise ImportError("tensorflow is blocked by tests/no_tensorflow: this run must not need it")
