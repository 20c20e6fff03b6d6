"""Scripts beside the package: generators the tests import (`from tools import fuzz, zoo, zoo_libs,
export_transformers, stdlib_text`), benchmarks and model builders. Each still runs as `python tools/x.py`: a
script that imports a sibling puts the checkout's root on sys.path first, when it is run that way."""
