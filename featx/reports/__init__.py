"""What a user reads: metrics (`evaluation`), plots (`plots`), the files of a result folder
(`report_folder`), the self-contained report.html (`html_report`), the export's model card
(`model_card`) and the audit's contact sheets (`contact_sheet`).

Importing this package loads nothing heavy: each module imports what it needs."""
