"""Local attention kernels for context parallelism: the chunk kernel (masks by global position,
returns the LSE), the merges of partial results, and torch's SDPA kernels with the LSE."""
