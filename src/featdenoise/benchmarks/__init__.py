"""featdenoise.benchmarks"""
