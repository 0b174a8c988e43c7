"""hf_kd: knowledge distillation of LLMs on the Hugging Face stack."""

__version__ = "0.1.0"
