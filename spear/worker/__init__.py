"""Running functions: the worker consuming invocations, attempts, the function Context, task
definitions and progress reporting."""
