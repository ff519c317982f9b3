"""Mutation testing (`make mutate`): mutmut over the modules that decide what is trusted."""
