"""mergekit-warp: WARP (Weight Averaged Rewarded Policies) and the merge engine under it."""

__version__ = "0.1.0"
