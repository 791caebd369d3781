"""One module per command, each with one public function of the command's name (also
`featx.NAME`): extract, merge, info, fit_head, finetune, predict, export, audit, report.
No command module imports another; what they share lives in the packages below them.

Importing this package loads nothing heavy: each module imports what it needs."""
