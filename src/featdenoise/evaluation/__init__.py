"""featdenoise.evaluation"""
