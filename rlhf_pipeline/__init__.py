"""rlhf-pipeline: pre-training, SFT, reward modelling and PPO for GPT-2-class models on the Hugging Face stack."""

__version__ = "0.1.0"
