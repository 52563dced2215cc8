"""Reward steering at inference time (issue 15): best-of-N, SMC / Feynman-Kac steering, search, RBF.

Being built; the entry point will be ``fd.steer.sample(field, reward, method=..., ...)``.
"""
