"""featdenoise.data"""
