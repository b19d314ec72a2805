"""Post-training weight quantization: the GPTQ core, its integer grid, and the GPTQ checkpoint packing."""
