"""feedbackalign's support code: data model and readers, models, forwards, sharding, checkpoints, caches.

What a user runs or subclasses stays at the repository's top level (train.py, eval.py, compare.py, trainers.py,
dataloader.py, losses.py); this package holds the rest, one concern per module.
"""
