"""The values of `--weights` (torch-free, so command-line parsers can name them without importing torch).

gguf = each GGUF tensor's own type (4-bit family -> int4, 8-bit and 6-bit -> int8, float -> dense);
bf16 = dense; int8 / int4 = quantized on load; auto = gguf for GGUF models on CPU, else bf16.
"""
WEIGHT_FORMATS = ("auto", "gguf", "bf16", "int8", "int4")

#: The values of `--activations`: what the quantized kernels multiply the weights with.
#: int8 = each row quantized per 32 columns (Q8_0) and multiplied in integers; exact = the dtype's own;
#: auto = int8 in bf16 on CPU, exact otherwise (fp32 is the tests' exactness mode).
ACTIVATIONS = ("auto", "int8", "exact")
