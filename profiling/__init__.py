"""flashdino.profiling"""
