from featx.cli import cli

cli(prog_name="featx")
