"""Streaming merge of LoRAs into base checkpoints (see engine.merge)."""
