"""The contract every process shares: wire messages and their codec, Redis keys and
stream access (the bus), the job queue, the configuration, the run-state fold, errors,
connections, published-weight directories. It imports no other rlstream layer and no
torch."""
