"""How replicas run together: the `Replica` (single, dp, ddp, fsdp: device, wrapping, no_sync,
reductions, the stop vote) and FSDP's sharding and distributed checkpoints. The only place that
calls torch.distributed.

Layer 3 of 9: may import `contract`, `config`.
"""
