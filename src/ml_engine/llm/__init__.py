"""Local LLM generation: GGUF writing and quantization, llama.cpp backends, sweep measurements."""
