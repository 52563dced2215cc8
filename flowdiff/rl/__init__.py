"""RL fine-tuning of flows toward a reward (issue 15): Flow-GRPO, DanceGRPO, G2RPO.

Being built.
"""
