"""The fedsr coordinator: Flower ServerApp, aggregation, checkpoints and reports (weights and numbers only)."""
