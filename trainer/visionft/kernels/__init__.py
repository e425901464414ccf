"""Fused Triton kernels for VLM fine-tuning, one file per kernel (forward, backward, autograd Function
and a PyTorch reference side by side).

- ``rms_norm``: RMSNorm, Llama/Qwen casting and Gemma's ``(1 + w)`` offset.
- ``rope``: rotary embeddings, including Qwen2-VL/2.5-VL multimodal M-RoPE (``mrope_section``).
- ``glu``: SwiGLU (``silu(g) * u``) and GeGLU (``gelu_tanh(g) * u``).
- ``fused_linear_ce``: ``lm_head`` + cross-entropy, chunked over tokens, no full logits.
- ``nf4``: NF4 dequantization of the bitsandbytes storage format (double-quantized absmax).
- ``lora_nf4``: a LoRA linear over a frozen NF4 base that keeps no dequantized weight alive.

Kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (tests). Import the submodules
directly; this package imports nothing heavy on its own.
"""
