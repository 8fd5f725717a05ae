"""flashdino.pipelines"""
