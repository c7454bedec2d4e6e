"""The plan: pipeline specs and their YAML, the stage registry and graph, budgets and allocation, the context
stages compute in. Imports kernels and errors only; never the runtime, evaluation or command line."""
