"""Sharded training: FSDP2 (torch's fully_shard) through Lightning's ModelParallelStrategy."""
