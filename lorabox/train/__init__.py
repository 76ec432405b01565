"""LoRA training (issue 4): config, data, objectives, models, the loop, samples and saving. Needs torch, diffusers,
peft and accelerate (the `torch` extra); nothing here is imported by the light commands."""
