"""Teams (LiteLLM's /team/*): shared budgets, rate limits and model lists for groups of keys."""
