"""Training: pure steps (step), where they run (parallel), optimizer and schedules (optim),
checkpoints (checkpoint), the loop (loop) and what a run writes (report)."""
