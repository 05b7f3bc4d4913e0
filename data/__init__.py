"""Data sets → chat samples, shared by training and evaluation. Imports nothing else of valign; importing
`valign.data.prompts` does not import `datasets`."""
