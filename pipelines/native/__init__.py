"""C++/CUDA sources of the flashdino DALI operator plugin (built by the repository's CMakeLists.txt).

`build.build_native_plugin(build_dir)` builds it; `flashdino.pipelines.dali.plugin` loads it.
"""
