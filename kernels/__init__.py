"""flashdino.kernels"""
