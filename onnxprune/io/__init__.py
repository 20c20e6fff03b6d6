"""Reading and writing models: external data, lazy weights, model folders."""
