"""flashdino.engine"""
