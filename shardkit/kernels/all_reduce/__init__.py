"""All-reduce kernels on peer memory: DDA flat (one-shot) and tree (two-shot) in Triton and CUDA C++,
and the fused all-reduce + residual + RMSNorm. Each module holds its kernel, its launcher and its
launch policy (a frozen config and the pure function of the shape that chooses it)."""
