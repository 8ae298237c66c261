"""The one training loop (placeholder while the trainers move onto it)."""


class Diverged(RuntimeError):
    """Training stopped because the loss or the gradients stayed non-finite."""
