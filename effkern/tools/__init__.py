"""Developer tools that ship with effkern (no GPU needed): ``gpu_compile`` compiles
every Triton kernel for Hopper and Ampere and checks registers, spills, shared
memory and tensor-core lowering (``effkern doctor --compile-gpu``)."""
