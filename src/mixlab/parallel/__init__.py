"""Scale-out applied from outside the single-device model: the memory plan (`plan`), the device
mesh, FSDP2, expert parallelism (all-to-all dispatch/combine) and distributed checkpoints."""
