"""The trainer: consume, group, advantage, loss, step, publish weights, commit."""
