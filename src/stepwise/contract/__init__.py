"""The batch contract and the rules around it, pure (no torch, no torch.distributed): the plan,
its end-of-run check, LR schedules, the sampler's order, loss items, the world and its launcher's
environment, the monitor, and the errors every layer raises.

Layer 1 of 9 (bottom): imports only its own modules.
"""
