"""Getting a LoRA ready to publish: hashes (hashes.py), private metadata (privacy.py), header metadata
rewrites with modelspec (meta.py) and Hugging Face model cards (card.py)."""
