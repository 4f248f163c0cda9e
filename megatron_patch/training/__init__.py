"""The two-stage trainer: arguments, model/optimizer setup, steps, checkpoints and the loop."""
