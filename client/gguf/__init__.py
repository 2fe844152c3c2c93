"""GGUF files for llama.cpp and Ollama: merged models (`model`) and LoRA adapters (`lora`).

Imports torch, numpy and the `gguf` package (the `worker` / `hotswap` extras);
the CLI imports these modules only when a GGUF is asked for.
"""
