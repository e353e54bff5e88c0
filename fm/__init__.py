"""Foundation models: self-attention, a GPT-2 we can read, KV-cache generation, SFT, DPO and LoRA.

Submodules are imported on use (`from fm.model import GPT`) so that `import fm` stays cheap.
"""
