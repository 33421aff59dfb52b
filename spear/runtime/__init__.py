"""How a function runs. `inprocess` runs Python callables in the worker process."""
