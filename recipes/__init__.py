"""Short, readable recipes: a dataset mapping plus method defaults."""
