"""featdenoise.training"""
