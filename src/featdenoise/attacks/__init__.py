"""featdenoise.attacks"""
