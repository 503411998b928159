from sglang_ext.cli import run

run()
