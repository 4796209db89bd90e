"""Merge math (`math`), grouping and schedules (`plan`), the streaming loop (`engine`) and the entry
points (`api`: slerp, lerp, ema, liti, inspect; `api.METHODS`)."""
