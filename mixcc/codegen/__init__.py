"""Back end: lowering of IR into a stage plan, and rendering plans to CUDA."""
