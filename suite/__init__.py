"""The suite's spine: config schemas, the training loop, the results store."""
